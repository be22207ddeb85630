"""Pydantic models of the sections of a sweep file, with their own consistency checks."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from mmts_search.schedules import SCHEDULE_FAMILIES

from ._problems import Problem, _checks_deferred, _format_number, _prefixed, _raise_problems
from .checks import (
    _cross_problems,
    _feasibility_problems,
    _param_value_problems,
    _storage_url_problem,
)
from .constants import (
    _DEVICE_PATTERN,
    _FACTORY_PATTERN,
    _NAME_PATTERN,
    _SCHEDULE_PARAMETERS,
    _SOURCE_FIELDS,
    _TRACKING_SCHEMES,
    _URL_SCHEME_PATTERN,
)
from .constraints import _constrained_parameters
from .params import Param, RangeParam, _one_or_many


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
