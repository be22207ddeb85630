"""Consistency checks of a sweep file's values and sections, and the size of a grid search."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mmts_search.schedules import FAMILY_PARAMETERS

from ._problems import Problem, _closest, _format_number, _show
from .constants import (
    _NAME_PATTERN,
    _S3_URL_PATTERN,
    _URL_SCHEME_PATTERN,
    INTEGER_PARAMETERS,
    OBJECTIVE_METRICS,
)
from .constraints import (
    _CONSTRAINTS,
    _constrained_parameters,
    _constraint_texts,
    _family_domains,
    _propagate,
)
from .params import _VALUE_RULES, RangeParam, _ValueRule

# The models module imports this one, so the model classes serve as type hints only.
if TYPE_CHECKING:
    from .models import DatasetSpec, ObjectiveSpec, PrunerSpec, ScheduleSpace, SearchSpec


# Upper limit on the combinations that the grid check enumerates for one family.
_MAX_GRID_COMBINATIONS = 100_000


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
