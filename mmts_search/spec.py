"""Pydantic models of a sweep file, and loading one from YAML with clear errors.

A sweep file names the datasets, the model, the training budget, the loss, the search space
of the schedule parameters, the search algorithm, the pruner, the objective, the resources of
one trial, the MLflow tracking target and where results go. `load_sweep` reads one and raises
`SweepValidationError` listing every problem at once, each with its dotted key path (for
example ``schedule.tau_min.low``), the bad value, the line in the file where known, and what
is allowed.

A schedule parameter is a range ``{low, high, log?, step?}``, a list of choices or a fixed
value. Three constraints link the parameters, and every helper here respects them:

- ts_cosine: ``tau_min < tau_max``.
- mmts: ``shift_min > alpha / 2``. The temperature ``0.5 * alpha * cos(2*pi*t / T) + shift``
  has its minimum at ``shift_min - alpha / 2``, which must stay positive.
- mmts: ``shift_max >= shift_min``.

Validation guarantees that every listed family has at least one point that satisfies them.
`feasible_param` narrows a parameter to the values that still admit a valid point, given
the values chosen so far, so that a sampler never proposes an invalid point.

Example:
    >>> spec = parse_sweep(
    ...     "name: demo\\ndatasets: [{name: digits, source: 'builtin:digits-lt'}]\\n"
    ...     "loss: infonce\\n",
    ...     overrides=["training.epochs=2"],
    ... )
    >>> spec.training.epochs
    2
"""

from __future__ import annotations

import copy
import difflib
import itertools
import logging
import math
import numbers
import os
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from mmts_search.schedules import FAMILY_PARAMETERS, MAX_LOGIT_SCALE, SCHEDULE_FAMILIES

__all__ = [
    "INTEGER_PARAMETERS",
    "OBJECTIVE_METRICS",
    "REPORTED_METRICS",
    "ConceptSource",
    "DatasetSpec",
    "ModelSpec",
    "ObjectiveSpec",
    "Param",
    "Problem",
    "PrunerSpec",
    "RangeParam",
    "ResourcesSpec",
    "ScheduleSpace",
    "SearchSpec",
    "SweepSpec",
    "SweepValidationError",
    "TrackingSpec",
    "TrainingSpec",
    "apply_overrides",
    "check_resources",
    "dump_sweep",
    "feasible_param",
    "grid_size",
    "load_sweep",
    "midpoint_params",
    "parse_sweep",
    "point_violations",
    "trial_spec",
]

logger = logging.getLogger(__name__)

_RECALLS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")

REPORTED_METRICS: tuple[str, ...] = (
    "epoch",
    "loss",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "rsum",
    "head_rsum",
    "mid_rsum",
    "tail_rsum",
    "tau_mean",
    "tau_min",
    "tau_max",
    "map",
    "ndcg",
    "objective",
    *(f"{group}_{recall}" for group in ("head", "mid", "tail") for recall in _RECALLS),
    *(f"cls_{recall}" for recall in _RECALLS),
    "cls_rsum",
)
"""Metric names the worker reports after every epoch (recalls and rsum in percent)."""

OBJECTIVE_METRICS: tuple[str, ...] = tuple(
    name for name in REPORTED_METRICS if name not in ("epoch", "objective")
)
"""Reported metrics that an objective may name: all but the epoch counter and itself."""

_LOWER_IS_BETTER = frozenset({"loss", "t2i_medr", "i2t_medr"})

INTEGER_PARAMETERS: frozenset[str] = frozenset({"oscillations"})
"""Schedule parameters that take whole numbers only."""

_SCHEDULE_PARAMETERS: tuple[str, ...] = tuple(
    dict.fromkeys(name for family in SCHEDULE_FAMILIES for name in FAMILY_PARAMETERS[family])
)

# Sources of the built-in and user datasets, and the DatasetSpec fields each one reads.
_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "builtin:digits-lt": ("imbalance_ratio", "test_per_class"),
    "builtin:synthetic-lt": (
        "n_items",
        "dim",
        "n_concepts",
        "zipf_exponent",
        "captions_per_item",
        "noise",
        "test_fraction",
    ),
    "features": ("path", "concepts"),
}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_URL_SCHEME_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_URL_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
_TRACKING_SCHEMES = frozenset(
    {"sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks"}
)

# Validation context key: when set, the models skip their consistency checks, and
# `parse_sweep` runs them itself to collect every problem with its full key path.
_DEFER_CHECKS = "mmts_defer_checks"

# Upper limit on the combinations that the grid check enumerates for one family.
_MAX_GRID_COMBINATIONS = 100_000


# --------------------------------------------------------------------------------------
# Problems and the validation error
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One invalid value of a sweep file.

    Attributes:
        path: dotted key path, such as ``schedule.tau_min.low`` or ``datasets.0.name``,
            or empty for a problem with the whole file (YAML syntax, empty file).
        value: the offending value as read (None for a missing key).
        message: plain-English sentences that state what is wrong, what is allowed and
            what to do.
        line: 1-based line in the sweep file, when the key comes from the file.
    """

    path: str
    value: Any
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "(file)"
        if self.line is not None:
            where = f"{where} (line {self.line})"
        return f"{where}: {self.message}"


class SweepValidationError(ValueError):
    """A sweep file, its overrides or its resource requests are invalid.

    Attributes:
        problems: every problem found, ordered by line in the file where known.
        source: the file name or ``<string>``.
    """

    def __init__(
        self, problems: Sequence[Problem], *, source: str = "<string>", title: str | None = None
    ) -> None:
        self.problems = list(problems)
        self.source = source
        self.title = title or f"Invalid sweep file {source}"
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        header = f"{self.title} ({count} problem{'' if count == 1 else 's'}):"
        return "\n".join([header, *(f"  - {problem}" for problem in self.problems)])


def _show(value: Any) -> str:
    """Format a value the way it would appear in a YAML file, shortened to 80 characters."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list, tuple)):
        try:
            dumped = yaml.safe_dump(
                list(value) if isinstance(value, tuple) else value,
                default_flow_style=True,
                width=1_000_000,
                sort_keys=False,
            )
            text = dumped.strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _prefixed(problems: Iterable[Problem], prefix: str) -> list[Problem]:
    return [
        replace(problem, path=f"{prefix}.{problem.path}" if problem.path else prefix)
        for problem in problems
    ]


def _checks_deferred(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_DEFER_CHECKS))


def _raise_problems(problems: list[Problem]) -> None:
    """Raise one ValueError that lists all problems (for models built in Python)."""
    if problems:
        raise ValueError(" ".join(str(problem) for problem in problems))


# --------------------------------------------------------------------------------------
# Base model and schedule parameter values
# --------------------------------------------------------------------------------------


class _SpecModel(BaseModel):
    """Base of the sweep models: unknown keys are errors, consistency checks run last.

    Subclasses list their consistency problems in `_own_problems`, with key paths relative
    to the model. Built from Python, they raise a ValueError listing them. `parse_sweep`
    instead defers them and collects the problems of all models at once.
    """

    model_config = ConfigDict(extra="forbid")

    def _own_problems(self) -> list[Problem]:
        return []

    @model_validator(mode="after")
    def _check_own_problems(self, info: ValidationInfo) -> Any:
        if not _checks_deferred(info):
            _raise_problems(self._own_problems())
        return self


def _param_error(message: str, value: Any, subpath: str | None = None) -> PydanticCustomError:
    context: dict[str, Any] = {"message": message, "value": value}
    if subpath:
        context["subpath"] = subpath
    return PydanticCustomError("sweep_param", "{message}", context)


class RangeParam(BaseModel):
    """A searched interval ``[low, high]`` of a schedule parameter.

    ``log: true`` samples uniformly in log space (needs ``low > 0``). ``step`` restricts the
    values to ``low + k * step``, where ``high`` must lie on that grid. ``log`` and ``step``
    do not combine. A range with ``low == high`` is rejected: write the fixed value instead.
    """

    model_config = ConfigDict(extra="forbid")

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False
    step: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_bounds(self) -> RangeParam:
        # Range problems are never deferred: the consistency checks of the schedule space
        # rely on every range being well formed.
        if self.low > self.high:
            raise _param_error(
                f"Reversed range: low ({_format_number(self.low)}) is above high "
                f"({_format_number(self.high)}). Swap the two values.",
                self.model_dump(exclude_none=True),
            )
        if self.low == self.high:
            raise _param_error(
                f"Empty range: low and high are both {_format_number(self.low)}. Use a "
                f"fixed value instead: write {_format_number(self.low)} in place of the "
                f"range.",
                self.model_dump(exclude_none=True),
            )
        if self.log and self.low <= 0:
            raise _param_error(
                f"A log range needs low > 0, got low {_format_number(self.low)}. Raise low "
                f"or set log: false.",
                self.low,
                "low",
            )
        if self.step is not None:
            self._check_step(self.step)
        return self

    def _check_step(self, step: float) -> None:
        if self.log:
            raise _param_error(
                "step cannot be combined with log: true, because log ranges are sampled "
                "without a grid. Remove step or set log: false.",
                step,
                "step",
            )
        if step <= 0:
            raise _param_error(f"step must be positive, got {_format_number(step)}.", step, "step")
        count = (self.high - self.low) / step
        if abs(count - round(count)) > 1e-6 * max(1.0, count):
            below = self.low + math.floor(count) * step
            raise _param_error(
                f"high ({_format_number(self.high)}) is not on the grid low + k * step "
                f"({_format_number(self.low)} + k * {_format_number(step)}). Use high "
                f"{below:.6g} or {below + step:.6g}.",
                self.high,
                "high",
            )


def _validate_fixed(value: Any) -> float | int:
    """Accept a fixed parameter value: a finite number or text that parses as one."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise _param_error(
        f"Expected a range such as {{low: 0.03, high: 0.3}}, a list of choices such as "
        f"[0.05, 0.1], or a fixed finite number, got {_show(value)}.",
        value,
    )


def _validate_choice(value: Any) -> float | int | str:
    """Accept one entry of a list of choices: a finite number or text."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    ):
        return float(value)
    raise _param_error(f"A choice must be a finite number or text, got {_show(value)}.", value)


def _param_kind(value: Any) -> str:
    if isinstance(value, (RangeParam, dict)):
        return "<range>"
    if isinstance(value, (list, tuple)):
        return "<choices>"
    return "<fixed>"


FixedValue = Annotated[
    float | int, PlainValidator(_validate_fixed, json_schema_input_type=float | int)
]
Choice = Annotated[
    float | int | str,
    PlainValidator(_validate_choice, json_schema_input_type=float | int | str),
]

Param = Annotated[
    Annotated[RangeParam, Tag("<range>")]
    | Annotated[list[Choice], Tag("<choices>")]
    | Annotated[FixedValue, Tag("<fixed>")],
    Discriminator(_param_kind),
]
"""A schedule parameter: a `RangeParam`, a list of choices, or a fixed number."""

# Tags that tell pydantic which union member to validate. Pydantic also puts them in error
# locations, and the error conversion drops them from key paths.
_UNION_TAGS = frozenset({"<range>", "<choices>", "<fixed>", "<one>", "<many>"})


def _one_or_many_kind(value: Any) -> str:
    return "<many>" if isinstance(value, (list, tuple)) else "<one>"


def _one_or_many(item: Any) -> Any:
    return Annotated[
        Annotated[item, Tag("<one>")] | Annotated[list[item], Tag("<many>")],
        Discriminator(_one_or_many_kind),
    ]


# --------------------------------------------------------------------------------------
# Sections of a sweep file
# --------------------------------------------------------------------------------------


def _storage_url_problem(value: str, *, what: str) -> str | None:
    """Return why a local path or ``s3://bucket/prefix`` URL is invalid, or None."""
    if not value.strip():
        return f"{what} is empty. Give a local folder or an s3://bucket/prefix URL."
    match = _URL_SCHEME_PATTERN.match(value)
    if match is None:
        return None
    if match.group(1) != "s3":
        return (
            f"{what} uses the unsupported scheme {match.group(1)!r}. Give a local folder or "
            f"an s3://bucket/prefix URL."
        )
    if not _S3_URL_PATTERN.match(value):
        return (
            f"{what} is not a valid S3 URL. Write s3://BUCKET/PREFIX, where BUCKET has 3 to "
            f"63 lowercase letters, digits, dots or hyphens."
        )
    return None


class ConceptSource(_SpecModel):
    """Where the concept clusters of a feature dataset come from.

    ``labels`` uses the class labels of the feature layout (or a labels file at ``path``),
    ``class_csv`` reads per-class counts from the CSV at ``path`` (``class_id,count``), and
    ``captions`` clusters the captions at ``path`` into ``clusters`` groups with K-Means.
    """

    kind: Literal["labels", "class_csv", "captions"]
    path: str | None = None
    clusters: int = Field(default=50, ge=2)

    def _own_problems(self) -> list[Problem]:
        problems = []
        if self.kind in ("class_csv", "captions") and self.path is None:
            example = "counts.csv" if self.kind == "class_csv" else "captions.txt"
            problems.append(
                Problem(
                    "path",
                    None,
                    f"Concept source {self.kind!r} needs a path to read. Add path: "
                    f"s3://bucket/prefix/{example} or a local file.",
                )
            )
        if self.path is not None:
            reason = _storage_url_problem(self.path, what="The concept path")
            if reason:
                problems.append(Problem("path", self.path, reason))
        if self.kind != "captions" and self.clusters != 50:
            problems.append(
                Problem(
                    "clusters",
                    self.clusters,
                    f"clusters applies only to kind: captions, but this source has kind "
                    f"{self.kind!r}. Remove clusters.",
                )
            )
        return problems


class DatasetSpec(_SpecModel):
    """One dataset of the sweep: a built-in long-tail set or features on disk or S3.

    Each source reads its own fields, and setting a field of another source is an error.
    ``builtin:digits-lt`` reads ``imbalance_ratio`` (ratio of the largest to the smallest
    class) and ``test_per_class``. ``builtin:synthetic-lt`` reads ``n_items``, ``dim``,
    ``n_concepts``, ``zipf_exponent``, ``captions_per_item``, ``noise`` and
    ``test_fraction``. ``features`` reads ``path`` and ``concepts``. ``seed`` defaults to
    ``training.seed``, and ``weight`` is the dataset's weight in the ``weighted_mean``
    objective.
    """

    name: str
    source: Literal["builtin:digits-lt", "builtin:synthetic-lt", "features"]
    imbalance_ratio: float = Field(default=10.0, ge=1, allow_inf_nan=False)
    test_per_class: int = Field(default=30, ge=1)
    n_items: int = Field(default=5000, ge=2)
    dim: int = Field(default=64, ge=1)
    n_concepts: int = Field(default=50, ge=1)
    zipf_exponent: float = Field(default=1.1, gt=0, allow_inf_nan=False)
    captions_per_item: int = Field(default=1, ge=1)
    noise: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    path: str | None = None
    concepts: ConceptSource | None = None
    seed: int | None = Field(default=None, ge=0)
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    def _own_problems(self) -> list[Problem]:
        problems = []
        if not _NAME_PATTERN.match(self.name):
            problems.append(
                Problem(
                    "name",
                    self.name,
                    f"Invalid dataset name {self.name!r}. Use up to 100 letters, digits, "
                    f"'_', '-' or '.', starting with a letter or digit. '/' is not allowed, "
                    f"because metrics of several datasets are reported as <dataset>/<metric>.",
                )
            )

        for other_source, fields in _SOURCE_FIELDS.items():
            if other_source == self.source:
                continue
            for field_name in fields:
                value = getattr(self, field_name)
                if value != type(self).model_fields[field_name].default:
                    problems.append(
                        Problem(
                            field_name,
                            value,
                            f"{field_name} applies only to source {other_source!r}, but "
                            f"this dataset has source {self.source!r}. Remove {field_name}.",
                        )
                    )

        if self.source == "features":
            problems.extend(self._feature_problems())
        if self.source == "builtin:synthetic-lt" and self.n_concepts > self.n_items:
            problems.append(
                Problem(
                    "n_concepts",
                    self.n_concepts,
                    f"n_concepts ({self.n_concepts}) exceeds n_items ({self.n_items}), so "
                    f"some concepts would have no item. Lower n_concepts or raise n_items.",
                )
            )
        return problems

    def _feature_problems(self) -> list[Problem]:
        problems = []
        if self.path is None:
            problems.append(
                Problem(
                    "path",
                    None,
                    "A features dataset needs path: the local folder or s3://bucket/prefix "
                    "that holds its feature files.",
                )
            )
        else:
            reason = _storage_url_problem(self.path, what="The dataset path")
            if reason:
                problems.append(Problem("path", self.path, reason))
        if self.concepts is not None:
            problems.extend(_prefixed(self.concepts._own_problems(), "concepts"))
        return problems


class ModelSpec(_SpecModel):
    """The dual encoder that a trial trains.

    ``small-encoders`` learns small encoders of raw inputs, ``projection`` learns heads on
    top of precomputed features, and ``factory`` calls ``factory`` (written
    ``package.module:function``) with ``factory_kwargs`` to build the model.
    ``embed_dim`` is the size of the shared embedding space.
    """

    kind: Literal["small-encoders", "projection", "factory"] = "small-encoders"
    embed_dim: int = Field(default=64, ge=1)
    hidden_dim: int = Field(default=256, ge=1)
    head: Literal["linear", "mlp"] = "linear"
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)

    def _own_problems(self) -> list[Problem]:
        problems = []
        if self.kind == "factory":
            if self.factory is None:
                problems.append(
                    Problem(
                        "factory",
                        None,
                        "Model kind 'factory' needs factory: package.module:function, the "
                        "function that builds the model.",
                    )
                )
            elif not _FACTORY_PATTERN.match(self.factory):
                problems.append(
                    Problem(
                        "factory",
                        self.factory,
                        f"Invalid factory {self.factory!r}. Write it as package.module:function, "
                        f"for example my_models.clip:build_model.",
                    )
                )
        else:
            for field_name in ("factory", "factory_kwargs"):
                value = getattr(self, field_name)
                if value:
                    problems.append(
                        Problem(
                            field_name,
                            value,
                            f"{field_name} applies only to kind: factory, but the model kind "
                            f"is {self.kind!r}. Remove {field_name} or set kind: factory.",
                        )
                    )
        return problems


class TrainingSpec(_SpecModel):
    """The training budget of one trial.

    ``epochs`` counts passes over the training split. ``lr`` is the learning rate and
    ``warmup_fraction`` the fraction of all optimizer steps spent in linear warmup.
    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=128, ge=2)
    lr: float = Field(default=2e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    warmup_fraction: float = Field(default=0.0, ge=0, lt=1)
    seed: int = Field(default=0, ge=0)
    device: str = "auto"
    save_model: bool = False
    eval_batch_size: int = Field(default=1024, ge=1)

    def _own_problems(self) -> list[Problem]:
        if _DEVICE_PATTERN.match(self.device):
            return []
        return [
            Problem(
                "device",
                self.device,
                f"Invalid device {self.device!r}. Use auto, cpu, cuda or cuda:N (N is the "
                f"GPU index).",
            )
        ]


FamilyName = Literal[SCHEDULE_FAMILIES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class _ValueRule:
    """Lower bound on the values of one schedule parameter."""

    minimum: float
    inclusive: bool
    reason: str

    def violation(self, name: str, value: float) -> str | None:
        ok = value >= self.minimum if self.inclusive else value > self.minimum
        if ok:
            return None
        bound = "at least" if self.inclusive else "above"
        return (
            f"{name} must be {bound} {_format_number(self.minimum)}, got "
            f"{_format_number(value)}. {self.reason}"
        )


_POSITIVE = _ValueRule(0.0, False, "Temperatures and margins must be positive.")
_VALUE_RULES: dict[str, _ValueRule] = {
    "tau": _POSITIVE,
    "tau_min": _POSITIVE,
    "tau_max": _POSITIVE,
    "shift_min": _POSITIVE,
    "shift_max": _POSITIVE,
    "tau_init": _ValueRule(
        1.0 / MAX_LOGIT_SCALE,
        True,
        f"The learnable schedule clips the logit scale 1/tau at {MAX_LOGIT_SCALE:g}.",
    ),
    "alpha": _ValueRule(0.0, True, "alpha is the amplitude of the cosine."),
    "oscillations": _ValueRule(1.0, True, "oscillations counts cosine periods in training."),
}


def _default_families() -> list[str]:
    # learnable is left out because it applies only to the InfoNCE loss.
    return [family for family in SCHEDULE_FAMILIES if family != "learnable"]


class ScheduleSpace(_SpecModel):
    """Schedule families to compare and the search space of their parameters.

    Each family reads its own parameters (``FAMILY_PARAMETERS``). Constant reads ``tau``,
    ts_cosine reads ``tau_min``, ``tau_max`` and ``oscillations``, mmts reads ``alpha``,
    ``oscillations``, ``shift_min`` and ``shift_max``, and learnable reads ``tau_init``.
    With the max-margin loss the values are margins instead of temperatures.
    ``oscillations`` counts cosine periods over the whole training run and takes whole
    numbers.
    """

    families: list[FamilyName] = Field(default_factory=_default_families)
    tau: Param = Field(default_factory=lambda: RangeParam(low=0.03, high=0.3, log=True))
    tau_min: Param = Field(default_factory=lambda: RangeParam(low=0.02, high=0.1))
    tau_max: Param = Field(default_factory=lambda: RangeParam(low=0.1, high=1.0))
    alpha: Param = Field(default_factory=lambda: RangeParam(low=0.0, high=0.2))
    oscillations: Param = Field(default_factory=lambda: RangeParam(low=1, high=8))
    shift_min: Param = Field(default_factory=lambda: RangeParam(low=0.02, high=0.2))
    shift_max: Param = Field(default_factory=lambda: RangeParam(low=0.1, high=0.5))
    tau_init: Param = Field(default_factory=lambda: RangeParam(low=0.01, high=0.2, log=True))

    def _own_problems(self) -> list[Problem]:
        problems = []
        if not self.families:
            problems.append(
                Problem(
                    "families",
                    [],
                    f"The list of families is empty. List at least one of: "
                    f"{', '.join(SCHEDULE_FAMILIES)}.",
                )
            )
        for family in sorted(
            {f for f in self.families if self.families.count(f) > 1},
            key=self.families.index,
        ):
            problems.append(
                Problem(
                    "families",
                    list(self.families),
                    f"Family {family!r} is listed more than once. List each family once.",
                )
            )

        invalid = set()
        for name in _SCHEDULE_PARAMETERS:
            value_problems = _param_value_problems(name, getattr(self, name))
            if value_problems:
                invalid.add(name)
            problems.extend(value_problems)

        # The constraints can only be checked on parameters whose values are valid.
        for family in dict.fromkeys(self.families):
            if invalid.isdisjoint(_constrained_parameters(family)):
                problems.extend(_feasibility_problems(self, family))
        return problems


class SearchSpec(_SpecModel):
    """How Optuna samples trials: the sampler, the trial budget and the study storage.

    ``num_samples`` is the total number of trials and ``max_concurrent`` the number that
    run at once. ``study_storage`` is an Optuna RDB URL (default: SQLite next to the sweep
    results). A trial is retried up to ``max_failures`` times after a crash.
    """

    algorithm: Literal["tpe", "random", "cmaes", "grid", "nsga2"] = "tpe"
    num_samples: int = Field(default=16, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = Field(default=0, ge=0)
    study_storage: str | None = None
    max_failures: int = Field(default=2, ge=0)

    def _own_problems(self) -> list[Problem]:
        if self.study_storage is None or _URL_SCHEME_PATTERN.match(self.study_storage):
            return []
        return [
            Problem(
                "study_storage",
                self.study_storage,
                "study_storage must be a database URL such as sqlite:///study.db or "
                "postgresql://user@host:5432/optuna.",
            )
        ]


class PrunerSpec(_SpecModel):
    """When to stop an unpromising trial early.

    ``grace_epochs`` epochs always run before a trial may be pruned. ``percentile`` is for
    kind percentile, ``patience`` and ``min_delta`` for patient, ``reduction_factor`` for
    successive_halving, hyperband and asha, ``p_threshold`` for wilcoxon (which compares
    trials across datasets and needs at least two).
    """

    kind: Literal[
        "median",
        "percentile",
        "successive_halving",
        "hyperband",
        "wilcoxon",
        "patient",
        "asha",
        "none",
    ] = "median"
    grace_epochs: int = Field(default=1, ge=0)
    percentile: float = Field(default=25.0, gt=0, lt=100)
    patience: int = Field(default=2, ge=1)
    min_delta: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    reduction_factor: int = Field(default=3, ge=2)
    p_threshold: float = Field(default=0.1, gt=0, le=1)


class ObjectiveSpec(_SpecModel):
    """The metric that the search optimizes, and how it combines datasets.

    ``metric`` is a reported metric (`OBJECTIVE_METRICS`), or with several datasets also
    ``<dataset>/<metric>``. The nsga2 sampler takes a list of metrics, and ``mode`` is then
    one direction for all of them or a list with one direction per metric. ``aggregate``
    combines the datasets' values (``weighted_mean`` uses each dataset's ``weight``).
    """

    metric: _one_or_many(str) = "rsum"  # type: ignore[valid-type]
    mode: _one_or_many(Literal["max", "min"]) = "max"  # type: ignore[valid-type]
    aggregate: Literal["mean", "min", "median", "weighted_mean"] = "mean"

    def metric_list(self) -> list[str]:
        """Return the objective metrics as a list (one entry unless the sampler is nsga2)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def mode_list(self) -> list[str]:
        """Return one direction (``max`` or ``min``) per metric of `metric_list`."""
        if isinstance(self.mode, str):
            return [self.mode] * len(self.metric_list())
        return list(self.mode)

    def _own_problems(self) -> list[Problem]:
        problems = []
        metrics = self.metric_list()
        if not metrics:
            problems.append(
                Problem("metric", [], "The list of metrics is empty. Name at least one metric.")
            )
        for metric in sorted({m for m in metrics if metrics.count(m) > 1}):
            problems.append(
                Problem("metric", metrics, f"Metric {metric!r} is listed more than once.")
            )
        if not isinstance(self.mode, str) and len(self.mode) != len(metrics):
            problems.append(
                Problem(
                    "mode",
                    list(self.mode),
                    f"mode lists {len(self.mode)} directions but metric names "
                    f"{len(metrics)} metrics. Give one direction per metric, or a single "
                    f"max or min for all.",
                )
            )
        return problems


class ResourcesSpec(_SpecModel):
    """Logical Ray resources that one trial reserves.

    ``gpu`` is 0, a fraction in (0, 1] to share a GPU between trials, or a whole number of
    GPUs. `check_resources` compares the request with the nodes of the Ray cluster.
    """

    cpu: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    gpu: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    def _own_problems(self) -> list[Problem]:
        if self.gpu <= 1 or self.gpu.is_integer():
            return []
        return [
            Problem(
                "gpu",
                self.gpu,
                f"gpu must be a fraction in (0, 1] to share one GPU or a whole number of "
                f"GPUs, got {_format_number(self.gpu)}. Use {math.floor(self.gpu)} or "
                f"{math.ceil(self.gpu)}.",
            )
        ]


class TrackingSpec(_SpecModel):
    """Where MLflow records the sweep (parent run) and its trials (child runs).

    ``uri`` is an MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, a
    local folder). ``register_model`` registers the best model under that name and needs
    ``log_model: true``.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "mmts"
    log_model: bool = False
    register_model: str | None = None

    def _own_problems(self) -> list[Problem]:
        problems = []
        match = _URL_SCHEME_PATTERN.match(self.uri)
        if not self.uri.strip():
            problems.append(
                Problem("uri", self.uri, "The tracking URI is empty. Use sqlite:///mlflow.db.")
            )
        elif match is not None:
            scheme = match.group(1).split("+")[0]
            if scheme not in _TRACKING_SCHEMES:
                problems.append(
                    Problem(
                        "uri",
                        self.uri,
                        f"Unsupported tracking URI scheme {scheme!r}. Use one of "
                        f"{', '.join(sorted(_TRACKING_SCHEMES))}, or a local folder.",
                    )
                )
            elif scheme == "sqlite" and not self.uri.startswith("sqlite:///"):
                problems.append(
                    Problem(
                        "uri",
                        self.uri,
                        "A SQLite URI needs three slashes before a relative path "
                        "(sqlite:///mlflow.db) and four before an absolute one.",
                    )
                )
        if not self.experiment.strip():
            problems.append(Problem("experiment", self.experiment, "The experiment name is empty."))
        if self.register_model is not None and not self.log_model:
            problems.append(
                Problem(
                    "register_model",
                    self.register_model,
                    "register_model needs a logged model. Set log_model: true or remove "
                    "register_model.",
                )
            )
        return problems


class SweepSpec(_SpecModel):
    """A whole sweep file: what to train, what to search and where results go.

    ``loss`` is ``infonce`` (schedule values are temperatures) or ``max_margin`` (schedule
    values are margins). ``storage`` is a local folder or ``s3://bucket/prefix`` for the
    sweep results (Tune's trial folders and checkpoints).
    """

    name: str
    datasets: list[DatasetSpec] = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    loss: Literal["infonce", "max_margin"] = "infonce"
    schedule: ScheduleSpace = Field(default_factory=ScheduleSpace)
    search: SearchSpec = Field(default_factory=SearchSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: str = "./mmts-results"

    def _own_problems(self) -> list[Problem]:
        sections = {name: getattr(self, name) for name in type(self).model_fields}
        return _cross_problems(sections)


# --------------------------------------------------------------------------------------
# Domains of schedule parameters and the constraints between them
# --------------------------------------------------------------------------------------


# A strict bound (shift_min > alpha/2) becomes the closed bound at the next float. The
# constraints scale by 1 or 0.5, which float64 computes exactly, so a value just inside one
# side's bound always leaves a partner just inside the other side's bound.


def _just_above(value: float) -> float:
    return math.nextafter(value, math.inf)


def _just_below(value: float) -> float:
    return math.nextafter(value, -math.inf)


def _clean(value: float) -> float:
    """Round a grid point to 15 significant digits: 0.1 + 2 * 0.05 becomes 0.2."""
    return float(f"{value:.15g}")


@dataclass(frozen=True)
class _Domain:
    """Values that one schedule parameter may take: a sorted finite set or an interval.

    An interval with ``step`` (or an integer interval) is the grid ``anchor + k * step``
    inside ``[low, high]``, where ``anchor`` is the low end of the original range.
    """

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False
    anchor: float = 0.0
    choices: tuple[float, ...] | None = None

    @classmethod
    def of(cls, param: Any, *, integer: bool) -> _Domain:
        if isinstance(param, RangeParam):
            return cls(param.low, param.high, param.log, param.step, integer, param.low)
        values = param if isinstance(param, list) else [param]
        numbers_sorted = tuple(sorted(float(value) for value in values))
        return cls(numbers_sorted[0], numbers_sorted[-1], integer=integer, choices=numbers_sorted)

    @property
    def grid_step(self) -> float | None:
        if self.step is not None:
            return self.step
        return 1.0 if self.integer else None

    def min(self) -> float:
        return self.low

    def max(self) -> float:
        return self.high

    def _grid_point(self, k: int) -> float:
        step = self.grid_step
        assert step is not None
        return _clean(self.anchor + k * step)

    def _snap_up(self, value: float) -> float:
        """Return the smallest grid point >= value (value itself without a grid)."""
        step = self.grid_step
        if step is None:
            return value
        k = math.ceil((value - self.anchor) / step - 1e-9)
        point = self._grid_point(k)
        return point if point >= value else self._grid_point(k + 1)

    def _snap_down(self, value: float) -> float:
        """Return the largest grid point <= value (value itself without a grid)."""
        step = self.grid_step
        if step is None:
            return value
        k = math.floor((value - self.anchor) / step + 1e-9)
        point = self._grid_point(k)
        return point if point <= value else self._grid_point(k - 1)

    def restrict(
        self,
        *,
        lower: float | None = None,
        lower_strict: bool = False,
        upper: float | None = None,
        upper_strict: bool = False,
    ) -> _Domain | None:
        """Return the values within the bounds, or None when no value is left."""
        if self.choices is not None:
            kept = tuple(
                value
                for value in self.choices
                if (lower is None or (value > lower if lower_strict else value >= lower))
                and (upper is None or (value < upper if upper_strict else value <= upper))
            )
            if not kept:
                return None
            return replace(self, low=kept[0], high=kept[-1], choices=kept)

        low, high = self.low, self.high
        if lower is not None:
            bound = _just_above(lower) if lower_strict else lower
            low = max(low, self._snap_up(bound))
        if upper is not None:
            bound = _just_below(upper) if upper_strict else upper
            high = min(high, self._snap_down(bound))
        if low > high:
            return None
        return replace(self, low=low, high=high)

    def midpoint(self) -> float:
        """Return the middle value: the median choice, else the (geometric) centre.

        The centre is rounded to 6 significant digits where that stays in the domain, so
        that a midpoint reads 0.125 rather than 0.1250000005.
        """
        if self.choices is not None:
            return self.choices[len(self.choices) // 2]
        centre = math.sqrt(self.low * self.high) if self.log else 0.5 * (self.low + self.high)
        step = self.grid_step
        if step is not None:
            k = math.floor((centre - self.anchor) / step + 0.5)
            centre = min(self.high, max(self.low, self._grid_point(k)))
        rounded = float(f"{centre:.6g}")
        return rounded if self.low <= rounded <= self.high else centre

    def values(self) -> list[float] | None:
        """Return every value of a finite domain, or None for a continuous interval."""
        if self.choices is not None:
            return list(self.choices)
        step = self.grid_step
        if step is None:
            return None
        first = math.ceil((self.low - self.anchor) / step - 1e-9)
        last = math.floor((self.high - self.anchor) / step + 1e-9)
        return [self._grid_point(k) for k in range(first, last + 1)]

    def to_param(self) -> Any:
        """Return the domain as a sweep-file parameter (fixed, list of choices or range)."""
        if self.choices is not None:
            values = [_as_output(value, self.integer) for value in self.choices]
            return values[0] if len(values) == 1 else values
        if self.low == self.high:
            return _as_output(self.low, self.integer)
        return RangeParam(low=self.low, high=self.high, log=self.log, step=self.step)


def _as_output(value: float, integer: bool) -> float | int:
    return int(round(value)) if integer else float(value)


@dataclass(frozen=True)
class _Constraint:
    """``scale * smaller < larger`` (strict) or ``scale * smaller <= larger``."""

    smaller: str
    larger: str
    scale: float
    strict: bool
    text: str

    def holds(self, params: Mapping[str, float]) -> bool:
        left = self.scale * params[self.smaller]
        right = params[self.larger]
        return left < right if self.strict else left <= right


_CONSTRAINTS: tuple[_Constraint, ...] = (
    _Constraint("tau_min", "tau_max", 1.0, True, "tau_min < tau_max"),
    _Constraint("alpha", "shift_min", 0.5, True, "shift_min > alpha/2"),
    _Constraint("shift_min", "shift_max", 1.0, False, "shift_max >= shift_min"),
)


def _propagate(domains: dict[str, _Domain]) -> dict[str, _Domain] | None:
    """Narrow the domains until every value has a partner in each constraint.

    The constraints form chains of monotone bounds, so once every value has a partner
    (arc consistency), any value of any domain extends to a valid point. Returns None
    when some domain becomes empty, meaning that no valid point exists.
    """
    domains = dict(domains)
    for _ in range(2 * len(_CONSTRAINTS) + 1):
        changed = False
        for constraint in _CONSTRAINTS:
            if constraint.smaller not in domains or constraint.larger not in domains:
                continue
            smaller = domains[constraint.smaller].restrict(
                upper=domains[constraint.larger].max() / constraint.scale,
                upper_strict=constraint.strict,
            )
            if smaller is None:
                return None
            larger = domains[constraint.larger].restrict(
                lower=constraint.scale * smaller.min(), lower_strict=constraint.strict
            )
            if larger is None:
                return None
            changed |= smaller != domains[constraint.smaller]
            changed |= larger != domains[constraint.larger]
            domains[constraint.smaller] = smaller
            domains[constraint.larger] = larger
        if not changed:
            break
    return domains


def _constrained_parameters(family: str) -> tuple[str, ...]:
    linked = {name for c in _CONSTRAINTS for name in (c.smaller, c.larger)}
    return tuple(name for name in FAMILY_PARAMETERS[family] if name in linked)


def _family_domains(
    schedule: ScheduleSpace, family: str, names: Iterable[str] | None = None
) -> dict[str, _Domain]:
    return {
        name: _Domain.of(getattr(schedule, name), integer=name in INTEGER_PARAMETERS)
        for name in (FAMILY_PARAMETERS[family] if names is None else names)
    }


def _check_family(family: str) -> None:
    if family not in FAMILY_PARAMETERS:
        raise ValueError(
            f"Unknown schedule family {family!r}. Use one of {', '.join(SCHEDULE_FAMILIES)}."
        )


def feasible_param(
    schedule: ScheduleSpace, family: str, name: str, chosen: Mapping[str, float] | None = None
) -> Any:
    """Narrow one parameter to the values that still admit a valid point of the family.

    A sampler that draws the family's parameters one at a time, each from
    ``feasible_param(schedule, family, name, values_so_far)``, never draws a point that
    breaks ``tau_min < tau_max``, ``shift_min > alpha/2`` or ``shift_max >= shift_min``.
    Any order of the parameters works.

    Args:
        schedule: a validated schedule space.
        family: a schedule family, such as ``"mmts"``.
        name: one of the family's parameters (`FAMILY_PARAMETERS`).
        chosen: values already drawn for other parameters of the family.

    Returns:
        A `RangeParam` (narrowed, same ``log`` and ``step``), a list of the remaining
        choices, or a fixed number when one value remains. Whole numbers for
        ``oscillations``.

    Raises:
        ValueError: unknown family or parameter, or no valid value remains.
    """
    _check_family(family)
    if name not in FAMILY_PARAMETERS[family]:
        raise ValueError(
            f"{family} has no parameter {name!r}. Its parameters are "
            f"{', '.join(FAMILY_PARAMETERS[family])}."
        )
    domains = _family_domains(schedule, family)
    for other, value in (chosen or {}).items():
        if other in domains and other != name:
            domains[other] = _Domain.of(float(value), integer=other in INTEGER_PARAMETERS)

    narrowed = _propagate(domains)
    if narrowed is None:
        raise ValueError(
            f"No value of {name} is valid given {dict(chosen or {})}: the constraints "
            f"{_constraint_texts(family)} cannot all hold."
        )
    return narrowed[name].to_param()


def _constraint_texts(family: str) -> str:
    texts = [
        constraint.text
        for constraint in _CONSTRAINTS
        if constraint.smaller in FAMILY_PARAMETERS[family]
    ]
    return ", ".join(texts) if texts else "(none)"


def point_violations(family: str, params: Mapping[str, Any]) -> list[str]:
    """List why ``params`` is not a valid point of ``family`` (empty when it is valid).

    Checks that exactly the family's parameters are given, that each is a finite number
    within its bound (temperatures and margins positive, ``alpha >= 0``, ``tau_init >=
    0.01``, ``oscillations`` a whole number >= 1), and the constraints ``tau_min <
    tau_max``, ``shift_min > alpha/2`` and ``shift_max >= shift_min``.
    """
    if family not in FAMILY_PARAMETERS:
        return [f"Unknown schedule family {family!r}. Use one of {', '.join(SCHEDULE_FAMILIES)}."]
    expected = FAMILY_PARAMETERS[family]
    violations = []
    missing = [name for name in expected if name not in params]
    if missing:
        violations.append(f"{family} needs {', '.join(missing)}, which are missing.")
    extra = [name for name in params if name not in expected]
    if extra:
        violations.append(
            f"{family} does not use {', '.join(map(str, extra))}. Its parameters are "
            f"{', '.join(expected)}."
        )

    numbers_by_name: dict[str, float] = {}
    for name in expected:
        if name not in params:
            continue
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            violations.append(f"{name} must be a number, got {_show(value)}.")
            continue
        number = float(value)
        if not math.isfinite(number):
            violations.append(f"{name} must be finite, got {_show(value)}.")
            continue
        if name in INTEGER_PARAMETERS and not number.is_integer():
            violations.append(f"{name} must be a whole number, got {_format_number(number)}.")
        rule = _VALUE_RULES.get(name)
        reason = rule.violation(name, number) if rule else None
        if reason:
            violations.append(reason)
        numbers_by_name[name] = number

    for constraint in _CONSTRAINTS:
        involved = constraint.smaller in numbers_by_name and constraint.larger in numbers_by_name
        if involved and not constraint.holds(numbers_by_name):
            violations.append(
                f"{family} needs {constraint.text}, but {constraint.smaller} = "
                f"{_format_number(numbers_by_name[constraint.smaller])} and "
                f"{constraint.larger} = {_format_number(numbers_by_name[constraint.larger])}."
            )
    return violations


def midpoint_params(spec: SweepSpec, family: str) -> dict[str, float]:
    """Return a valid point of ``family`` in the middle of the sweep's search space.

    Each parameter takes its fixed value, else the median of its choices, else the centre
    of its range (the geometric centre for log ranges). Each range is first narrowed by the
    values chosen before it (`feasible_param`), so the point satisfies every constraint.
    ``oscillations`` is returned as an int. `mmts-search trial` uses this point.

    Raises:
        ValueError: unknown family, or no valid point (possible only for a family that the
            sweep does not list, because validation checks the listed ones).
    """
    _check_family(family)
    domains = _family_domains(spec.schedule, family)
    point: dict[str, float] = {}
    for name in FAMILY_PARAMETERS[family]:
        narrowed = _propagate(domains)
        if narrowed is None:
            raise ValueError(
                f"Sweep {spec.name} has no valid {family} point: the constraints "
                f"{_constraint_texts(family)} cannot all hold in its search space."
            )
        domain = narrowed[name]
        value = _as_output(domain.midpoint(), domain.integer)
        point[name] = value
        domains[name] = _Domain.of(value, integer=domain.integer)
    return point


# --------------------------------------------------------------------------------------
# Consistency checks
# --------------------------------------------------------------------------------------


def _param_value_problems(name: str, param: Any) -> list[Problem]:
    """Check the values of one schedule parameter against its bound and integrality."""
    rule = _VALUE_RULES.get(name)
    integer = name in INTEGER_PARAMETERS
    problems = []

    if isinstance(param, RangeParam):
        checks = [("low", param.low), ("high", param.high)]
        if param.step is not None:
            checks.append(("step", param.step))
        for key, value in checks:
            if integer and not float(value).is_integer():
                problems.append(
                    Problem(
                        f"{name}.{key}",
                        value,
                        f"{name} takes whole numbers, but {key} is {_format_number(value)}.",
                    )
                )
        reason = rule.violation(name, param.low) if rule else None
        if reason:
            problems.append(Problem(f"{name}.low", param.low, reason))
        return problems

    if isinstance(param, list):
        if not param:
            return [
                Problem(
                    name,
                    [],
                    f"The list of choices for {name} is empty. List at least one value, or "
                    f"give a range or a fixed value.",
                )
            ]
        for index, value in enumerate(param):
            problems.extend(_fixed_value_problems(f"{name}.{index}", name, value, rule, integer))
        return problems

    return _fixed_value_problems(name, name, param, rule, integer)


def _fixed_value_problems(
    path: str, name: str, value: Any, rule: _ValueRule | None, integer: bool
) -> list[Problem]:
    if isinstance(value, str):
        return [
            Problem(
                path,
                value,
                f"{name} takes numbers, got the text {value!r}. Write the number without quotes.",
            )
        ]
    problems = []
    if integer and not float(value).is_integer():
        problems.append(
            Problem(path, value, f"{name} takes whole numbers, got {_format_number(value)}.")
        )
    reason = rule.violation(name, float(value)) if rule else None
    if reason:
        problems.append(Problem(path, value, reason))
    return problems


def _bound_path(schedule: ScheduleSpace, name: str, bound: str) -> tuple[str, Any]:
    """Return the key path and value of a parameter's low or high end."""
    param = getattr(schedule, name)
    if isinstance(param, RangeParam):
        return f"{name}.{bound}", getattr(param, bound)
    return name, param


def _feasibility_problems(schedule: ScheduleSpace, family: str) -> list[Problem]:
    """Explain why no point of ``family`` satisfies its constraints (empty if one does)."""
    domains = _family_domains(schedule, family, _constrained_parameters(family))
    if _propagate(domains) is not None:
        return []

    if family == "ts_cosine":
        tau_min, tau_max = domains["tau_min"], domains["tau_max"]
        if tau_min.min() >= tau_max.max():
            path, value = _bound_path(schedule, "tau_min", "low")
            return [
                Problem(
                    path,
                    value,
                    f"ts_cosine needs tau_min < tau_max, but the smallest tau_min "
                    f"({_format_number(tau_min.min())}) is not below the largest tau_max "
                    f"({_format_number(tau_max.max())}), so no valid point exists. Lower "
                    f"tau_min or raise tau_max.",
                )
            ]

    if family == "mmts":
        alpha, shift_min, shift_max = domains["alpha"], domains["shift_min"], domains["shift_max"]
        half_alpha = 0.5 * alpha.min()
        if shift_min.max() <= half_alpha:
            path, value = _bound_path(schedule, "shift_min", "high")
            return [
                Problem(
                    path,
                    value,
                    f"mmts needs shift_min > alpha/2, because the temperature of the rarest "
                    f"concept falls to shift_min - alpha/2 and must stay positive. The "
                    f"largest shift_min ({_format_number(shift_min.max())}) is not above "
                    f"alpha/2 = {_format_number(half_alpha)} even for the smallest alpha "
                    f"({_format_number(alpha.min())}). Raise shift_min or lower alpha.",
                )
            ]
        if shift_max.max() <= half_alpha or shift_max.max() < shift_min.min():
            path, value = _bound_path(schedule, "shift_max", "high")
            return [
                Problem(
                    path,
                    value,
                    f"mmts needs shift_max >= shift_min > alpha/2, but the largest "
                    f"shift_max ({_format_number(shift_max.max())}) is not above both "
                    f"alpha/2 = {_format_number(half_alpha)} and the smallest shift_min "
                    f"({_format_number(shift_min.min())}). Raise shift_max.",
                )
            ]

    names = ", ".join(FAMILY_PARAMETERS[family])
    return [
        Problem(
            "families",
            family,
            f"No combination of the {family} values ({names}) satisfies "
            f"{_constraint_texts(family)}. Add values that satisfy them.",
        )
    ]


def _metric_problem(metric: str, dataset_names: list[str]) -> str | None:
    """Return why the worker does not report ``metric``, or None when it does."""
    if metric in OBJECTIVE_METRICS:
        return None
    if "/" in metric:
        dataset, _, name = metric.partition("/")
        if len(dataset_names) < 2:
            return (
                f"A dataset prefix such as {metric!r} applies only to sweeps with several "
                f"datasets, but this sweep has one. Use {name!r}."
            )
        if dataset not in dataset_names:
            suggestion = _closest(dataset, dataset_names)
            hint = f" Did you mean {suggestion!r}?" if suggestion else ""
            return (
                f"No dataset is named {dataset!r}.{hint} The datasets are "
                f"{', '.join(dataset_names)}."
            )
        if name in OBJECTIVE_METRICS:
            return None
        metric = name
    suggestion = _closest(metric, OBJECTIVE_METRICS)
    hint = f" Did you mean {suggestion!r}?" if suggestion else ""
    prefix_note = ", each also as <dataset>/<metric>" if len(dataset_names) > 1 else ""
    return (
        f"The worker does not report the metric {metric!r}.{hint} Use one of "
        f"{_OBJECTIVE_METRICS_TEXT}{prefix_note}."
    )


# The recalls with a head_, mid_, tail_ or cls_ prefix are summarized, not listed.
_OBJECTIVE_METRICS_TEXT = (
    ", ".join(
        name
        for name in OBJECTIVE_METRICS
        if not name.startswith(("head_", "mid_", "tail_", "cls_")) or name.endswith("_rsum")
    )
    + ", or a recall with the prefix head_, mid_, tail_ or cls_ (such as tail_t2i_r1)"
)


def _objective_problems(objective: ObjectiveSpec, datasets: list[DatasetSpec]) -> list[Problem]:
    problems = []
    names = [dataset.name for dataset in datasets]
    metrics = objective.metric_list()
    for index, metric in enumerate(metrics):
        reason = _metric_problem(metric, names)
        if reason:
            path = (
                "objective.metric"
                if isinstance(objective.metric, str)
                else (f"objective.metric.{index}")
            )
            problems.append(Problem(path, metric, reason))
    return problems


def _search_objective_problems(
    search: SearchSpec, objective: ObjectiveSpec, pruner: PrunerSpec | None
) -> list[Problem]:
    problems = []
    count = len(objective.metric_list())
    if search.algorithm == "nsga2" and count < 2:
        problems.append(
            Problem(
                "objective.metric",
                objective.metric,
                "The nsga2 sampler optimizes several objectives and needs at least two "
                "metrics, for example [rsum, tail_rsum]. Add a metric or use tpe.",
            )
        )
    if search.algorithm != "nsga2" and count > 1:
        problems.append(
            Problem(
                "objective.metric",
                objective.metric,
                f"The {search.algorithm} sampler optimizes exactly one metric, got {count}. "
                f"Name one metric, or use algorithm: nsga2 for several.",
            )
        )
    if pruner is not None and count > 1 and pruner.kind != "none":
        problems.append(
            Problem(
                "pruner.kind",
                pruner.kind,
                f"Pruners compare one metric, but the objective has {count}. Set "
                f"pruner.kind: none for a multi-objective sweep.",
            )
        )
    return problems


def _grid_problems(schedule: ScheduleSpace) -> list[Problem]:
    """Check that a grid sampler can enumerate the space and that every point is valid."""
    problems = []
    seen: set[str] = set()
    for family in dict.fromkeys(schedule.families):
        family_ok = True
        for name in FAMILY_PARAMETERS[family]:
            param = getattr(schedule, name)
            if isinstance(param, RangeParam) and param.step is None:
                family_ok = False
                if name not in seen:
                    problems.append(
                        Problem(
                            f"schedule.{name}",
                            param,
                            f"The grid sampler runs every listed value, so it cannot search "
                            f"the continuous range {_show(param)}. List the values, for "
                            f"example [{_format_number(param.low)}, "
                            f"{_format_number(param.high)}], or add a step.",
                        )
                    )
            seen.add(name)
        if family_ok:
            problems.extend(_grid_combination_problems(schedule, family))
    return problems


def _grid_combination_problems(schedule: ScheduleSpace, family: str) -> list[Problem]:
    names = FAMILY_PARAMETERS[family]
    value_lists = []
    for name in names:
        values = _family_domains(schedule, family)[name].values()
        value_lists.append(values or [])
    if math.prod(len(values) for values in value_lists) > _MAX_GRID_COMBINATIONS:
        return []
    for combination in itertools.product(*value_lists):
        point = dict(zip(names, combination, strict=True))
        broken = [
            constraint
            for constraint in _CONSTRAINTS
            if constraint.smaller in point
            and constraint.larger in point
            and not constraint.holds(point)
        ]
        if broken:
            involved = (broken[0].smaller, broken[0].larger)
            shown = ", ".join(f"{name}={_format_number(point[name])}" for name in involved)
            return [
                Problem(
                    "schedule.families",
                    family,
                    f"The grid sampler runs every combination of the {family} values, and "
                    f"the combination {shown} breaks {broken[0].text}. Remove the values "
                    f"that break it or use another algorithm.",
                )
            ]
    return []


def grid_size(schedule: ScheduleSpace) -> int | None:
    """Return the number of points a grid search runs, or None for a continuous space.

    The points of all listed families add up. Within a family, every combination of its
    parameters' values is one point.
    """
    total = 0
    for family in dict.fromkeys(schedule.families):
        domains = _family_domains(schedule, family)
        family_total = 1
        for domain in domains.values():
            values = domain.values()
            if values is None:
                return None
            family_total *= len(values)
        total += family_total
    return total


def _cross_problems(sections: Mapping[str, Any]) -> list[Problem]:
    """Check the rules that involve several sections, skipping sections that failed.

    Paths are full key paths (``objective.metric``).
    """
    problems = []
    name = sections.get("name")
    if isinstance(name, str) and not _NAME_PATTERN.match(name):
        problems.append(
            Problem(
                "name",
                name,
                f"Invalid sweep name {name!r}. Use up to 100 letters, digits, '_', '-' or "
                f"'.', starting with a letter or digit, because the name becomes part of "
                f"folder and experiment names.",
            )
        )
    storage = sections.get("storage")
    if isinstance(storage, str):
        reason = _storage_url_problem(storage, what="storage")
        if reason:
            problems.append(Problem("storage", storage, reason))

    datasets = sections.get("datasets")
    if datasets:
        problems.extend(_duplicate_dataset_problems(datasets))

    schedule = sections.get("schedule")
    search = sections.get("search")
    pruner = sections.get("pruner")
    objective = sections.get("objective")
    training = sections.get("training")
    resources = sections.get("resources")

    if objective is not None and datasets:
        problems.extend(_objective_problems(objective, datasets))
    if search is not None and objective is not None:
        problems.extend(_search_objective_problems(search, objective, pruner))
    if pruner is not None and datasets and pruner.kind == "wilcoxon" and len(datasets) < 2:
        problems.append(
            Problem(
                "pruner.kind",
                "wilcoxon",
                f"The wilcoxon pruner compares trials dataset by dataset and needs at least "
                f"two datasets, but the sweep has {len(datasets)}. Add a dataset or use "
                f"another pruner, such as median.",
            )
        )
    if (
        pruner is not None
        and training is not None
        and pruner.kind != "none"
        and pruner.grace_epochs >= training.epochs
    ):
        problems.append(
            Problem(
                "pruner.grace_epochs",
                pruner.grace_epochs,
                f"grace_epochs ({pruner.grace_epochs}) must be below training.epochs "
                f"({training.epochs}), otherwise no trial is ever pruned. Lower it or "
                f"set pruner.kind: none.",
            )
        )
    if (
        search is not None
        and schedule is not None
        and search.algorithm == "grid"
        and not schedule._own_problems()
    ):
        problems.extend(_grid_problems(schedule))
    if (
        training is not None
        and resources is not None
        and training.device.startswith("cuda")
        and resources.gpu == 0
    ):
        problems.append(
            Problem(
                "training.device",
                training.device,
                f"training.device is {training.device!r}, but resources.gpu is 0, so Ray "
                f"gives the trials no GPU. Set resources.gpu (for example 1 or 0.5) or "
                f"use device: auto.",
            )
        )
    if (
        sections.get("loss") == "max_margin"
        and schedule is not None
        and "learnable" in schedule.families
    ):
        problems.append(
            Problem(
                "schedule.families",
                list(schedule.families),
                "The learnable family applies only to loss: infonce. A learned margin "
                "shrinks toward zero, because a smaller margin always lowers the hinge "
                "loss. Remove learnable from the families.",
            )
        )
    return problems


def _duplicate_dataset_problems(datasets: list[DatasetSpec]) -> list[Problem]:
    problems = []
    first_index: dict[str, int] = {}
    for index, dataset in enumerate(datasets):
        if dataset.name in first_index:
            problems.append(
                Problem(
                    f"datasets.{index}.name",
                    dataset.name,
                    f"Duplicate dataset name {dataset.name!r}, also used by datasets."
                    f"{first_index[dataset.name]}. Give every dataset its own name, because "
                    f"metrics are reported per dataset name.",
                )
            )
        else:
            first_index[dataset.name] = index
    return problems


# --------------------------------------------------------------------------------------
# Key paths in the models: unknown keys and overrides
# --------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _as_index(key: str | int) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if key.isdigit() else None


def _resolve_key(annotation: Any, key: str | int) -> tuple[Any, FieldInfo | None] | None:
    """Return the annotation (and field) of ``key`` inside ``annotation``, or None."""
    annotation = _unwrap(annotation)
    if annotation is Any:
        return Any, None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(key))
        return (field.annotation, field) if field is not None else None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            found = _resolve_key(member, key)
            if found is not None:
                return found
        return None
    if origin is list:
        return (get_args(annotation)[0], None) if _as_index(key) is not None else None
    if origin is dict:
        return get_args(annotation)[1], None
    return None


def _field_names(annotation: Any) -> list[str]:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    if get_origin(annotation) in (Union, types.UnionType):
        return [name for member in get_args(annotation) for name in _field_names(member)]
    return []


def _annotation_at(loc: Sequence[str | int]) -> Any:
    annotation: Any = SweepSpec
    for key in loc:
        found = _resolve_key(annotation, key)
        if found is None:
            return None
        annotation = found[0]
    return annotation


@cache
def _key_homes() -> dict[str, list[str]]:
    """Map each key of a model section to the paths where it is valid (``training``)."""
    homes: dict[str, list[str]] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        for name, field in model.model_fields.items():
            homes.setdefault(name, []).append(path or "the top level")
            child = _unwrap(field.annotation)
            if get_origin(child) is list:
                child = _unwrap(get_args(child)[0])
                if isinstance(child, type) and issubclass(child, BaseModel):
                    visit(child, f"{path + '.' if path else ''}{name}.N")
                continue
            if get_origin(child) in (Union, types.UnionType):
                members = [_unwrap(member) for member in get_args(child)]
                models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
                child = models[0] if len(models) == 1 and RangeParam not in models else None
            if isinstance(child, type) and issubclass(child, BaseModel) and child is not RangeParam:
                visit(child, f"{path + '.' if path else ''}{name}")

    visit(SweepSpec, "")
    return homes


def _unknown_key_message(key: str | int, parent_annotation: Any) -> str:
    valid = _field_names(parent_annotation)
    if not valid:
        return f"Unknown key {key!r}."
    suggestion = _closest(str(key), valid)
    listing = f"Valid keys here: {', '.join(valid)}."
    if suggestion:
        return f"Unknown key {key!r}. Did you mean {suggestion!r}? {listing}"
    homes = _key_homes().get(str(key))
    if homes:
        return f"Unknown key {key!r} here. It belongs under {' or '.join(homes)}. {listing}"
    return f"Unknown key {key!r}. {listing}"


class _OverrideError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _OverrideError(
            "An override must have the form key.path=value, for example training.epochs=4."
        )
    parts = key.split(".")
    if any(not part for part in parts):
        raise _OverrideError(f"The key path {key!r} has an empty part. Separate keys with one dot.")
    try:
        value = yaml.load(raw, Loader=_SweepLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _OverrideError(
            f"The value {raw!r} is not valid YAML ({_yaml_reason(exc)}). Quote text that "
            f"contains ':', '#', '[' or '{{'."
        ) from None
    return parts, value


def _apply_override(data: dict[str, Any], text: str) -> list[str]:
    """Set one ``key.path=value`` in ``data`` in place and return the key path."""
    parts, value = _parse_override(text)
    annotation: Any = SweepSpec
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the top level"
        if isinstance(node, list):
            index = _as_index(part)
            if index is None:
                raise _OverrideError(
                    f"{here} is a list, so the next key must be an index such as 0, got {part!r}."
                )
            if index >= len(node):
                entries = "1 entry" if len(node) == 1 else f"{len(node)} entries"
                raise _OverrideError(
                    f"Index {index} is out of range: {here} has {entries}. To add entries, "
                    f"set the whole list."
                )
            found = _resolve_key(annotation, index)
            key: str | int = index
        else:
            found = _resolve_key(annotation, part)
            if found is None:
                raise _OverrideError(_unknown_key_message(part, annotation))
            key = part

        if depth == len(parts) - 1:
            node[key] = value
            return parts

        child_annotation, field = found if found is not None else (Any, None)
        child = node[int(key)] if isinstance(node, list) else node.get(key)
        if child is None:
            child = _default_container(field)
            node[key] = child
        if not isinstance(child, (dict, list)):
            path = ".".join(parts[: depth + 1])
            raise _OverrideError(
                f"{path} is the single value {_show(child)}, so it has no key "
                f"{parts[depth + 1]!r}. Set {path}=... to replace the whole value."
            )
        node, annotation = child, child_annotation
    return parts


def _default_container(field: FieldInfo | None) -> Any:
    """Return the plain-data default of a missing section, so that one key can be set."""
    if field is None:
        return {}
    if get_origin(_unwrap(field.annotation)) is list and field.is_required():
        return []
    default = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json", exclude_none=True)
    if isinstance(default, (dict, list)):
        return copy.deepcopy(default)
    return {}


def _apply_overrides(
    data: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], list[list[str]]]:
    result = copy.deepcopy(data)
    problems = []
    paths = []
    for text in overrides:
        # A failed override must leave no half-made sections behind, so each one is applied
        # to a copy first.
        attempt = copy.deepcopy(result)
        try:
            paths.append(_apply_override(attempt, text))
        except _OverrideError as exc:
            problems.append(Problem(text.partition("=")[0].strip(), text, exc.message))
            continue
        result = attempt
    return result, problems, paths


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of a parsed sweep file with ``key.path=value`` overrides applied.

    Values are parsed as YAML (``families=[mmts]`` is a list, ``epochs=4`` an int). An
    integer key indexes a list (``datasets.0.imbalance_ratio=20``). A key may be absent
    from the file as long as the sweep models define it: a missing section starts from its
    defaults (``schedule.tau.low=0.05`` keeps the default ``high``).

    Raises:
        SweepValidationError: one problem per override with an unknown key (naming the
            closest valid key), an index out of range or a value that is not valid YAML.
    """
    result, problems, _ = _apply_overrides(data, overrides)
    if problems:
        raise SweepValidationError(problems, source="--set overrides")
    return result


# --------------------------------------------------------------------------------------
# YAML and pydantic errors to problems
# --------------------------------------------------------------------------------------


class _SweepLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``2E5`` as floats, as YAML 1.2 does."""


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if not context:
        return str(problem)
    context_mark = getattr(exc, "context_mark", None)
    problem_mark = getattr(exc, "problem_mark", None)
    if context_mark is not None and (
        problem_mark is None or context_mark.line != problem_mark.line
    ):
        context = f"{context} that starts at line {context_mark.line + 1}"
    return f"{problem} ({context})"


def _yaml_syntax_problem(exc: yaml.YAMLError, text: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    reason = _yaml_reason(exc)
    if mark is None:
        return Problem("", None, f"Invalid YAML: {reason}.")
    line_text = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    hint = (
        " Indent with spaces, not tabs."
        if "\t" in line_text
        else (" Check the indentation, the colons and the quotes on this line and the one above.")
    )
    return Problem(
        "",
        line_text.strip(),
        f"Invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {reason}.{hint}",
        line=mark.line + 1,
    )


def _node_lines(
    node: yaml.Node, path: tuple[str, ...], lines: dict[str, int], problems: list[Problem]
) -> None:
    """Record the line of every key path under ``node`` and report duplicate keys."""
    if len(path) > 32:
        return
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = (*path, key)
            if key in first_line:
                problems.append(
                    Problem(
                        ".".join(child),
                        key,
                        f"Duplicate key {key!r}, first at line {first_line[key]}. YAML keeps "
                        f"only the last value, so remove one of them.",
                        line=line,
                    )
                )
            first_line.setdefault(key, line)
            lines[".".join(child)] = line
            _node_lines(value_node, child, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, str(index))
            lines[".".join(child)] = item.start_mark.line + 1
            _node_lines(item, child, lines, problems)


def _read_yaml(text: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """Parse YAML text and return the data, the line of each key path and duplicate keys.

    Raises:
        SweepValidationError: the text is not valid YAML (no source name yet).
    """
    loader = _SweepLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise SweepValidationError([_yaml_syntax_problem(exc, text)]) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _node_lines(node, (), lines, problems)
    return data, lines, problems


def _literal_options(err: Mapping[str, Any]) -> list[str]:
    expected = str((err.get("ctx") or {}).get("expected", ""))
    return re.findall(r"'([^']*)'", expected)


_TYPE_MESSAGES = {
    "int_type": "Expected a whole number, got {value}.",
    "int_parsing": "Expected a whole number, got {value}.",
    "int_from_float": "Expected a whole number, got {value}.",
    "float_type": "Expected a number, got {value}.",
    "float_parsing": "Expected a number, got {value}.",
    "finite_number": "Expected a finite number, got {value}.",
    "bool_type": "Expected true or false, got {value}.",
    "bool_parsing": "Expected true or false, got {value}.",
    "string_type": "Expected text, got {value}. Quote the value if it is meant as text.",
    "list_type": "Expected a list such as [a, b], got {value}.",
    "dict_type": "Expected a mapping of keys to values, got {value}.",
    "model_type": "Expected a mapping of keys to values, got {value}.",
    "model_attributes_type": "Expected a mapping of keys to values, got {value}.",
}

_BOUND_MESSAGES = {
    "greater_than": ("gt", "Must be greater than {bound}, got {value}."),
    "greater_than_equal": ("ge", "Must be at least {bound}, got {value}."),
    "less_than": ("lt", "Must be less than {bound}, got {value}."),
    "less_than_equal": ("le", "Must be at most {bound}, got {value}."),
}


def _error_message(err: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    shown = _show(value)

    if kind == "sweep_param":
        return str(ctx["message"])
    if kind == "missing":
        return f"The required key {loc[-1]!r} is missing. Add it." if loc else "Missing value."
    if kind == "extra_forbidden":
        return _unknown_key_message(loc[-1], _annotation_at(loc[:-1]))
    if kind == "literal_error":
        options = _literal_options(err)
        suggestion = _closest(str(value), options) if isinstance(value, str) else None
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        return f"{shown} is not allowed.{hint} Allowed values: {', '.join(options)}."
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind].format(value=shown)
    if kind in _BOUND_MESSAGES:
        key, template = _BOUND_MESSAGES[kind]
        return template.format(bound=ctx.get(key), value=shown)
    if kind == "too_short":
        return (
            f"Needs at least {ctx.get('min_length')} "
            f"entr{'y' if ctx.get('min_length') == 1 else 'ies'}, got {shown}."
        )
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']} (got {shown})."


def _problems_from_validation_error(
    exc: ValidationError, prefix: tuple[str | int, ...] = ()
) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(
            part for part in err["loc"] if not (isinstance(part, str) and part in _UNION_TAGS)
        )
        ctx = err.get("ctx") or {}
        value = err.get("input")
        if err["type"] == "sweep_param":
            value = ctx.get("value")
            if ctx.get("subpath"):
                loc = (*loc, *str(ctx["subpath"]).split("."))
        elif err["type"] == "missing":
            value = None
        path = ".".join(str(part) for part in loc)
        problems.append(Problem(path, value, _error_message(err, loc)))
    return problems


@cache
def _section_adapter(name: str) -> TypeAdapter[Any]:
    annotation = SweepSpec.model_fields[name].annotation
    assert annotation is not None
    return TypeAdapter(annotation)


def _validate_sections(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Validate each top-level section on its own, after the whole file failed.

    Returns the sections that are valid on their own (so that the consistency checks can
    still run on them) and the consistency problems of single datasets.
    """
    sections: dict[str, Any] = {}
    problems: list[Problem] = []
    context = {_DEFER_CHECKS: True}
    for name, field in SweepSpec.model_fields.items():
        if name == "datasets":
            continue
        if name in data:
            try:
                sections[name] = _section_adapter(name).validate_python(data[name], context=context)
            except ValidationError:
                continue
        elif not field.is_required():
            sections[name] = field.get_default(call_default_factory=True, validated_data={})

    raw_datasets = data.get("datasets")
    if isinstance(raw_datasets, list):
        datasets = []
        for index, raw in enumerate(raw_datasets):
            try:
                dataset = DatasetSpec.model_validate(raw, context=context)
            except ValidationError:
                continue
            datasets.append(dataset)
            problems.extend(_prefixed(dataset._own_problems(), f"datasets.{index}"))
        if raw_datasets and len(datasets) == len(raw_datasets):
            sections["datasets"] = datasets
    return sections, problems


def _section_problems(sections: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for name, section in sections.items():
        if isinstance(section, _SpecModel):
            problems.extend(_prefixed(section._own_problems(), name))
    return problems


def _validate(data: dict[str, Any]) -> tuple[SweepSpec | None, list[Problem]]:
    """Validate parsed sweep data and return the spec (None if invalid) and every problem."""
    context = {_DEFER_CHECKS: True}
    try:
        spec = SweepSpec.model_validate(data, context=context)
    except ValidationError as exc:
        problems = _problems_from_validation_error(exc)
        sections, dataset_problems = _validate_sections(data)
        problems.extend(dataset_problems)
        problems.extend(_section_problems(sections))
        problems.extend(_cross_problems(sections))
        return None, problems

    sections = {name: getattr(spec, name) for name in SweepSpec.model_fields}
    problems = []
    for index, dataset in enumerate(spec.datasets):
        problems.extend(_prefixed(dataset._own_problems(), f"datasets.{index}"))
    problems.extend(_section_problems(sections))
    problems.extend(_cross_problems(sections))
    return (spec if not problems else None), problems


def _line_of(path: str, lines: Mapping[str, int], overridden: list[list[str]]) -> int | None:
    """Return the line of ``path`` (or of its nearest parent) unless an override set it."""
    parts = path.split(".") if path else []
    for override in overridden:
        common = min(len(override), len(parts))
        if override[:common] == parts[:common]:
            return None
    for end in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:end]))
        if line is not None:
            return line
    return None


def _sorted_unique(problems: Iterable[Problem]) -> list[Problem]:
    unique: dict[tuple[str, str], Problem] = {}
    for problem in problems:
        unique.setdefault((problem.path, problem.message), problem)
    return sorted(unique.values(), key=lambda problem: problem.line if problem.line else math.inf)


def _log_warnings(spec: SweepSpec, source: str) -> None:
    """Log choices that are valid but probably not meant."""
    for metric, mode in zip(spec.objective.metric_list(), spec.objective.mode_list(), strict=True):
        if metric.rpartition("/")[2] in _LOWER_IS_BETTER and mode == "max":
            logger.warning(
                "%s: objective %s is lower-is-better but mode is max. Set objective.mode: min "
                "unless that is intended",
                source,
                metric,
            )
    if spec.search.algorithm == "grid":
        size = grid_size(spec.schedule)
        if size is not None and size != spec.search.num_samples:
            logger.warning(
                "%s: the grid has %d points but search.num_samples is %d, so %s",
                source,
                size,
                spec.search.num_samples,
                "some points do not run"
                if size > spec.search.num_samples
                else "some points may run more than once",
            )


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def parse_sweep(text: str, *, source: str = "<string>", overrides: Sequence[str] = ()) -> SweepSpec:
    """Parse and validate the YAML text of a sweep file.

    Args:
        text: the YAML document.
        source: name shown in errors, usually the file path.
        overrides: ``key.path=value`` strings applied after parsing (`apply_overrides`).

    Raises:
        SweepValidationError: listing every problem: YAML syntax (with line and column),
            duplicate or unknown keys, wrong types, invalid values and inconsistent
            sections, each with its key path, value and line where known.
    """
    try:
        data, lines, problems = _read_yaml(text)
    except SweepValidationError as exc:
        raise SweepValidationError(exc.problems, source=source) from None

    if data is None:
        raise SweepValidationError(
            [Problem("", None, "The sweep file is empty. Start from search_spaces/demo.yaml.")],
            source=source,
        )
    if not isinstance(data, dict):
        raise SweepValidationError(
            [
                Problem(
                    "",
                    data,
                    f"A sweep file must be a mapping of keys (name, datasets, ...), got "
                    f"{type(data).__name__} {_show(data)}.",
                    line=1,
                )
            ],
            source=source,
        )

    data, override_problems, overridden = _apply_overrides(data, overrides)
    spec, validation_problems = _validate(data)
    problems = [
        *problems,
        *override_problems,
        *(
            replace(problem, line=_line_of(problem.path, lines, overridden))
            for problem in validation_problems
        ),
    ]
    if problems or spec is None:
        raise SweepValidationError(_sorted_unique(problems), source=source)
    _log_warnings(spec, source)
    return spec


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SweepSpec:
    """Read, parse and validate a sweep file.

    Raises:
        SweepValidationError: the file cannot be read, or any problem of `parse_sweep`.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        message = "The sweep file does not exist. Check the path."
        raise SweepValidationError([Problem("", source, message)], source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        message = f"Cannot read the sweep file: {exc}."
        raise SweepValidationError([Problem("", source, message)], source=source) from None
    return parse_sweep(text, source=source, overrides=overrides)


def dump_sweep(spec: SweepSpec, *, comment: str | None = None) -> str:
    """Write a sweep as YAML that `parse_sweep` reads back to an equal spec.

    Keys left at None are omitted, as are the fields of other dataset sources and the
    schedule parameters that no listed family reads and that keep their defaults.

    Args:
        spec: the sweep to write.
        comment: optional text written as ``#`` comment lines at the top.
    """
    data = spec.model_dump(mode="json", exclude_none=True)

    for dataset_data, dataset in zip(data["datasets"], spec.datasets, strict=True):
        for source, fields in _SOURCE_FIELDS.items():
            if source != dataset.source:
                for field_name in fields:
                    dataset_data.pop(field_name, None)

    used = {name for family in spec.schedule.families for name in FAMILY_PARAMETERS[family]}
    defaults = ScheduleSpace()
    for name in _SCHEDULE_PARAMETERS:
        if name not in used and getattr(spec.schedule, name) == getattr(defaults, name):
            data["schedule"].pop(name, None)

    for name, value in data["schedule"].items():
        data["schedule"][name] = _flow_style(value)
    body = yaml.dump(
        _flow_style_lists(data), Dumper=_SweepDumper, sort_keys=False, default_flow_style=False
    )
    if not comment:
        return body
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return header + body


class _FlowDict(dict):  # type: ignore[type-arg]
    """A mapping that `dump_sweep` writes on one line, such as a range."""


class _FlowList(list):  # type: ignore[type-arg]
    """A list of scalars that `dump_sweep` writes on one line."""


class _SweepDumper(yaml.SafeDumper):
    """SafeDumper that writes `_FlowDict` and `_FlowList` in flow style."""


_SweepDumper.add_representer(
    _FlowDict,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)
_SweepDumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def _flow_style(value: Any) -> Any:
    return _FlowDict(value) if isinstance(value, dict) else value


def _flow_style_lists(value: Any) -> Any:
    """Mark every list of scalars for flow style, recursively."""
    if isinstance(value, _FlowDict):
        return value
    if isinstance(value, dict):
        return {key: _flow_style_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return _FlowList(value)
        return [_flow_style_lists(item) for item in value]
    return value


def trial_spec(spec: SweepSpec, family: str, params: Mapping[str, Any]) -> SweepSpec:
    """Return the sweep fixed to one point: one family, each of its parameters fixed.

    This is what `mmts-search trial` runs and what the driver writes as the best
    configuration. Parameters of other families return to their defaults.

    Args:
        spec: the sweep.
        family: the schedule family of the point.
        params: the family's parameter values. A flat trial configuration also works:
            its ``family`` key must match and ``optuna_trial_number`` is ignored.

    Raises:
        ValueError: unknown family, missing or unknown parameters, or a point that breaks
            a bound or a constraint (`point_violations`).
    """
    _check_family(family)
    values = {
        name: value
        for name, value in params.items()
        if name not in ("family", "optuna_trial_number")
    }
    if "family" in params and params["family"] != family:
        raise ValueError(f"The configuration is for family {params['family']!r}, not {family!r}.")
    violations = point_violations(family, values)
    if violations:
        raise ValueError(f"Invalid {family} point {values}: " + " ".join(violations))

    schedule: dict[str, Any] = {"families": [family]}
    for name in FAMILY_PARAMETERS[family]:
        schedule[name] = _as_output(float(values[name]), name in INTEGER_PARAMETERS)
    data = spec.model_dump(mode="json", exclude_none=True)
    data["schedule"] = schedule
    return SweepSpec.model_validate(data)


def check_resources(spec: SweepSpec, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Check that some node of the Ray cluster can run one trial of the sweep.

    Args:
        spec: the sweep.
        nodes: the node list of ``ray.nodes()``: dicts with ``Alive`` and ``Resources``
            (``{"CPU": 16.0, "GPU": 1.0, ...}``).

    Raises:
        SweepValidationError: a trial requests more GPUs or CPUs than the largest live
            node offers, or the cluster has no live node.
    """
    alive = [node for node in nodes if node.get("Alive", True)]
    title = f"Sweep {spec.name} does not fit the Ray cluster"
    if not alive:
        problem = Problem("resources", None, "The Ray cluster reports no live node.")
        raise SweepValidationError([problem], source="ray.nodes()", title=title)

    largest = {
        kind: max(float((node.get("Resources") or {}).get(kind, 0.0)) for node in alive)
        for kind in ("GPU", "CPU")
    }
    problems = []
    requests = (("gpu", spec.resources.gpu, "GPU"), ("cpu", spec.resources.cpu, "CPU"))
    for key, requested, kind in requests:
        if requested > largest[kind]:
            problems.append(
                Problem(
                    f"resources.{key}",
                    requested,
                    f"Each trial requests {_format_number(requested)} {kind}, but the "
                    f"largest of the {len(alive)} live nodes has "
                    f"{_format_number(largest[kind])}. Lower resources.{key} or add a node "
                    f"with more {kind}s.",
                )
            )
    if problems:
        raise SweepValidationError(problems, source="ray.nodes()", title=title)
