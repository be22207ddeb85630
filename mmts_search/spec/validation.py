"""Validation of parsed sweep data: pydantic errors to problems, section checks, warnings."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ._problems import _DEFER_CHECKS, Problem, _closest, _prefixed, _show
from .checks import _cross_problems, grid_size
from .constants import _LOWER_IS_BETTER
from .models import DatasetSpec, SweepSpec, _SpecModel
from .overrides import _annotation_at, _unknown_key_message
from .params import _UNION_TAGS

logger = logging.getLogger(__name__)


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
