"""Entry points: parse or load a sweep file, fix it to one trial point, check its resources."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from mmts_search.schedules import FAMILY_PARAMETERS

from ._problems import Problem, SweepValidationError, _format_number, _show
from .constants import INTEGER_PARAMETERS
from .constraints import _as_output, _check_family, point_violations
from .models import SweepSpec
from .overrides import _apply_overrides
from .validation import _line_of, _log_warnings, _sorted_unique, _validate
from .yaml_io import _read_yaml


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
