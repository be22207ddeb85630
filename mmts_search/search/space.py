"""Define-by-run Optuna search space over schedule families and their parameters.

The space samples ``family`` first (a categorical over ``schedule.families``), then only
that family's parameters, as listed in `mmts_search.schedules.FAMILY_PARAMETERS`. Each
parameter value of the sweep file maps to one kind of domain:

- a number is fixed: it is returned as a constant and never suggested;
- a list is a categorical (``suggest_categorical``);
- a range is ``suggest_float`` (``suggest_int`` for ``oscillations``), with ``log`` and
  ``step`` passed through.

The constraints of the schedules are built into the bounds, so that no trial ever receives
an invalid point:

- ``mmts``: ``shift_min >= alpha/2 + MIN_TEMPERATURE_GAP`` (every temperature
  ``shift(c) + 0.5 * alpha * cos(...)`` stays positive) and ``shift_max >= shift_min``;
- ``ts_cosine``: ``tau_max >= tau_min + MIN_TEMPERATURE_GAP``.

Fixed values and categoricals are drawn first. Each range then gets a lower bound from the
parameters it must exceed and an upper bound from the largest values still possible for
the parameters that must exceed it. For example, ``alpha`` is capped at
``2 * (max shift_min - gap)``, so a feasible ``shift_min`` always remains.
`SearchSpace.from_spec` checks every combination of categorical values up front and
raises `SearchSpaceError` when one of them leaves no valid point.

For ``search.algorithm: grid`` the space enumerates every valid point instead
(`SearchSpace.grid_points`), and the define-by-run function suggests one categorical,
``grid_point``, whose choices are the point labels that `optuna.samplers.GridSampler`
walks through. The chosen point's parameters are returned as constants and also stored as
user attributes of the Optuna trial, so that optuna-dashboard shows them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from mmts_search.schedules import FAMILY_PARAMETERS

__all__ = [
    "FAMILY_CONSTRAINTS",
    "GRID_POINT_PARAM",
    "MAX_GRID_POINTS",
    "MIN_TEMPERATURE_GAP",
    "Constraint",
    "ParamDomain",
    "SearchSpace",
    "SearchSpaceError",
    "TRIAL_NUMBER_KEY",
    "check_constraints",
]

# Smallest temperature a strict constraint leaves: shift_min - alpha/2 and tau_max - tau_min
# are at least this. A gap of 0 would allow temperatures of 1e-12, whose logits overflow.
MIN_TEMPERATURE_GAP = 1e-3

# Parameters sampled as integers (``suggest_int``); every other parameter is a float.
INTEGER_PARAMETERS = frozenset({"oscillations"})

# Key of the constant that carries the Optuna trial number into the Tune config.
TRIAL_NUMBER_KEY = "optuna_trial_number"

# Name of the single categorical that a grid search suggests.
GRID_POINT_PARAM = "grid_point"

# A grid larger than this is rejected: each point is one full training run.
MAX_GRID_POINTS = 10_000

# Values closer than this count as equal when a non-strict constraint is checked, so that
# a floating-point rounding of a step lattice does not reject a point on the boundary.
_FLOAT_TOLERANCE = 1e-9


class SearchSpaceError(ValueError):
    """The sweep file's schedule space cannot be searched.

    Attributes:
        problems: ``(key path, value, message)`` for each problem, for example
            ``("schedule.shift_min", [0.01], "no value is above alpha/2 + 0.001 ...")``.
    """

    def __init__(self, problems: Sequence[tuple[str, Any, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{path} = {value!r}: {message}" for path, value, message in self.problems]
        super().__init__("invalid search space:\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class Constraint:
    """The rule ``upper >= scale * lower + gap`` between two parameters of one family."""

    lower: str
    upper: str
    scale: float
    gap: float

    def holds(self, lower_value: float, upper_value: float) -> bool:
        """Return whether the two values satisfy the rule."""
        bound = self.scale * lower_value + self.gap
        if self.gap > 0:
            return upper_value >= bound
        return upper_value >= bound - _FLOAT_TOLERANCE

    def describe(self) -> str:
        """Return the rule as text, for example ``shift_min >= 0.5 * alpha + 0.001``."""
        scaled = self.lower if self.scale == 1 else f"{self.scale:g} * {self.lower}"
        return f"{self.upper} >= {scaled}" + (f" + {self.gap:g}" if self.gap else "")


FAMILY_CONSTRAINTS: dict[str, tuple[Constraint, ...]] = {
    "constant": (),
    "ts_cosine": (Constraint("tau_min", "tau_max", 1.0, MIN_TEMPERATURE_GAP),),
    "mmts": (
        Constraint("alpha", "shift_min", 0.5, MIN_TEMPERATURE_GAP),
        Constraint("shift_min", "shift_max", 1.0, 0.0),
    ),
    "learnable": (),
}


@dataclass(frozen=True)
class ParamDomain:
    """The values one schedule parameter may take.

    ``kind`` is ``"fixed"`` (``value``), ``"choice"`` (``choices``) or ``"range"``
    (``low`` to ``high`` inclusive, optionally on a log scale or a ``step`` lattice).
    """

    name: str
    kind: str
    value: float | int | None = None
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    is_int: bool = False

    @classmethod
    def from_value(cls, name: str, raw: Any) -> ParamDomain:
        """Build the domain of ``name`` from its sweep-file value (number, list or range)."""
        is_int = name in INTEGER_PARAMETERS
        if isinstance(raw, bool):
            raise SearchSpaceError([(f"schedule.{name}", raw, "expected a number, list or range")])
        if isinstance(raw, (int, float)):
            integral = is_int and float(raw).is_integer()
            return cls(name, "fixed", value=int(raw) if integral else float(raw), is_int=is_int)
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise SearchSpaceError([(f"schedule.{name}", list(raw), "the list is empty")])
            choices = tuple(int(v) if is_int else float(v) for v in raw)
            return cls(name, "choice", choices=choices, is_int=is_int)
        if isinstance(raw, Mapping):
            low, high = raw["low"], raw["high"]
            log, step = bool(raw.get("log", False)), raw.get("step")
        else:
            low, high = raw.low, raw.high
            log, step = bool(getattr(raw, "log", False)), getattr(raw, "step", None)
        if is_int:
            step = int(step) if step else 1
            return cls(name, "range", low=int(math.ceil(low)), high=int(math.floor(high)),
                       log=log, step=step, is_int=True)
        return cls(name, "range", low=float(low), high=float(high), log=log,
                   step=float(step) if step else None)

    def values(self) -> list[float | int]:
        """Return every value of a fixed or categorical domain, or of a range with a step."""
        if self.kind == "fixed":
            return [self.value]  # type: ignore[list-item]
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None:
            raise SearchSpaceError([(f"schedule.{self.name}", self.describe(),
                                     "a grid needs a list, a fixed value or a range with step")])
        count = int(math.floor((self.high - self.low) / self.step + _FLOAT_TOLERANCE)) + 1
        return [self._lattice_value(k) for k in range(count)]

    def describe(self) -> str:
        """Return the domain as text, for example ``float [0.01, 0.5] log``."""
        if self.kind == "fixed":
            return f"fixed {self.value}"
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices)
        kind = "int" if self.is_int else "float"
        text = f"{kind} [{self.low:g}, {self.high:g}]"
        if self.log:
            text += " log"
        if self.step is not None and not (self.is_int and self.step == 1):
            text += f" step {self.step:g}"
        return text

    def _lattice_value(self, k: int) -> float | int:
        if self.is_int:
            return int(self.low + k * self.step)  # type: ignore[operator]
        return _clean_float(self.low + k * self.step)  # type: ignore[operator]

    def snap_interval(self, low: float, high: float) -> tuple[float, float]:
        """Shrink ``[low, high]`` to the domain's lattice (integers or ``step``)."""
        if self.step is None:
            return low, high
        first = math.ceil((low - self.low) / self.step - _FLOAT_TOLERANCE)
        last = math.floor((high - self.low) / self.step + _FLOAT_TOLERANCE)
        return self._lattice_value(max(first, 0)), self._lattice_value(last)


@dataclass
class SearchSpace:
    """Define-by-run space of one sweep; call it with an Optuna trial to sample a point.

    Instances are plain data, so they pickle with the Tune searcher state (Tune saves
    the searcher, define-by-run function included, for `Tuner.restore`).

    Example:
        >>> space = SearchSpace.from_schedule(
        ...     families=["constant"], values={"tau": {"low": 0.01, "high": 0.1, "log": True}})
        >>> study = optuna.create_study(direction="maximize")
        >>> config = space(study.ask())
        >>> sorted(config)
        ['family', 'optuna_trial_number', 'tau']
    """

    families: tuple[str, ...]
    domains: dict[str, dict[str, ParamDomain]]
    grid: bool = False
    _grid_points: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_spec(cls, spec: Any) -> SearchSpace:
        """Build the space of a `mmts_search.spec.SweepSpec` (``schedule`` and ``search``).

        Raises:
            SearchSpaceError: naming each parameter whose values leave no valid point.
        """
        schedule = spec.schedule
        names = {name for family in schedule.families for name in FAMILY_PARAMETERS[family]}
        values = {name: getattr(schedule, name) for name in names}
        return cls.from_schedule(
            families=list(schedule.families),
            values=values,
            grid=spec.search.algorithm == "grid",
        )

    @classmethod
    def from_schedule(
        cls, *, families: Iterable[str], values: Mapping[str, Any], grid: bool = False
    ) -> SearchSpace:
        """Build the space from family names and the raw value of each parameter.

        Args:
            families: schedule families to search, each one of ``FAMILY_PARAMETERS``.
            values: parameter name -> number, list or range (an object or mapping with
                ``low``, ``high`` and optional ``log`` and ``step``).
            grid: enumerate every valid point for `optuna.samplers.GridSampler`.
        """
        families = tuple(dict.fromkeys(families))
        problems: list[tuple[str, Any, str]] = []
        if not families:
            problems.append(("schedule.families", [], "at least one family is required"))

        domains: dict[str, dict[str, ParamDomain]] = {}
        for family in families:
            if family not in FAMILY_PARAMETERS:
                problems.append(("schedule.families", family,
                                 f"unknown family; expected one of {sorted(FAMILY_PARAMETERS)}"))
                continue
            domains[family] = {}
            for name in FAMILY_PARAMETERS[family]:
                if name not in values:
                    problems.append((f"schedule.{name}", None, f"missing for family {family}"))
                    continue
                try:
                    domains[family][name] = ParamDomain.from_value(name, values[name])
                except SearchSpaceError as error:
                    problems.extend(error.problems)
        if problems:
            raise SearchSpaceError(problems)

        space = cls(families=families, domains=domains, grid=grid)
        space._check_domains()
        if not grid:
            # A grid drops the invalid combinations instead (`grid_points`).
            space._check_feasible()
        if grid:
            points = space.grid_points()
            space._grid_points = {_point_label(p["family"], p["params"]): p for p in points}
        return space

    def __call__(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Sample one point with ``trial``; return the constants of the Tune config.

        The returned dict is the whole flat Tune config: ``family``, that family's
        parameters and ``optuna_trial_number``. Ray's `OptunaSearch` merges it over the
        suggested values, so its cleaned floats win over the raw suggestions.
        """
        if self.grid:
            return self._sample_grid(trial)

        family = trial.suggest_categorical("family", list(self.families))
        params = self.sample_params(trial, family)
        return {"family": family, **params, TRIAL_NUMBER_KEY: trial.number}

    def sample_params(self, trial: optuna.trial.Trial, family: str) -> dict[str, Any]:
        """Sample the parameters of ``family`` with ``trial`` in constraint order."""
        domains = self.domains[family]
        values: dict[str, Any] = {}

        # Fixed values and categoricals first: their choices cannot move, so the ranges
        # around them adapt to what they picked.
        for name, domain in domains.items():
            if domain.kind == "fixed":
                values[name] = domain.value
            elif domain.kind == "choice":
                values[name] = trial.suggest_categorical(name, list(domain.choices))

        for name, domain in domains.items():
            if domain.kind != "range":
                continue
            low, high = self.bounds(family, name, values)
            if domain.is_int:
                values[name] = trial.suggest_int(name, int(low), int(high),
                                                 step=int(domain.step or 1), log=domain.log)
            else:
                suggested = trial.suggest_float(name, low, high, step=domain.step, log=domain.log)
                values[name] = _clean_float(min(max(suggested, low), high))

        self._repair_rounding(family, values)
        return {name: values[name] for name in FAMILY_PARAMETERS[family]}

    def bounds(self, family: str, name: str, known: Mapping[str, Any]) -> tuple[float, float]:
        """Return the interval a range parameter may take, given the ``known`` values.

        The lower bound comes from constraints on known parameters that ``name`` must
        exceed. The upper bound comes from the largest value still possible for each
        parameter that must exceed ``name``.

        Raises:
            SearchSpaceError: when the interval is empty (`from_spec` rules this out).
        """
        domain = self.domains[family][name]
        low, high = domain.low, self._max_value(family, name, known)
        for constraint in FAMILY_CONSTRAINTS[family]:
            if constraint.upper == name and constraint.lower in known:
                low = max(low, constraint.scale * float(known[constraint.lower]) + constraint.gap)
        low, high = domain.snap_interval(low, high)
        if low > high + _FLOAT_TOLERANCE:
            raise SearchSpaceError([(f"schedule.{name}", domain.describe(),
                                     f"no valid value for family {family} given {dict(known)}")])
        return low, max(low, high)

    def grid_points(self) -> list[dict[str, Any]]:
        """Return every valid point, ``{"family": ..., "params": {...}}``, family by family.

        Raises:
            SearchSpaceError: for a range without ``step``, or more than `MAX_GRID_POINTS`.
        """
        points: list[dict[str, Any]] = []
        for family in self.families:
            names = list(FAMILY_PARAMETERS[family])
            axes = [self.domains[family][name].values() for name in names]
            count = math.prod(len(axis) for axis in axes)
            if len(points) + count > MAX_GRID_POINTS:
                raise SearchSpaceError([("schedule", family,
                                         f"the grid has more than {MAX_GRID_POINTS} points; "
                                         "use fewer values or another search.algorithm")])
            for combination in itertools.product(*axes):
                params = dict(zip(names, combination, strict=True))
                if not check_constraints(family, params):
                    points.append({"family": family, "params": params})
        if not points:
            raise SearchSpaceError([("schedule", list(self.families),
                                     "no grid point satisfies the constraints")])
        return points

    def grid_labels(self) -> list[str]:
        """Return the labels of the grid points, the choices of ``grid_point``."""
        return list(self._grid_points)

    def grid_size(self) -> int:
        """Return the number of valid grid points (what ``num_samples`` becomes for grid)."""
        return len(self._grid_points) if self.grid else len(self.grid_points())

    def describe(self) -> list[tuple[str, str, str]]:
        """Return ``(family, parameter, domain)`` rows for display, constraints included."""
        rows: list[tuple[str, str, str]] = []
        for family in self.families:
            for name, domain in self.domains[family].items():
                rows.append((family, name, domain.describe()))
            for constraint in FAMILY_CONSTRAINTS[family]:
                rows.append((family, "constraint", constraint.describe()))
        return rows

    def _sample_grid(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        label = trial.suggest_categorical(GRID_POINT_PARAM, list(self._grid_points))
        point = self._grid_points[label]
        for name, value in point["params"].items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("family", point["family"])
        return {"family": point["family"], **point["params"], TRIAL_NUMBER_KEY: trial.number}

    def _max_value(self, family: str, name: str, known: Mapping[str, Any]) -> float:
        """Largest value ``name`` can still take so that every later constraint holds."""
        if name in known:
            return float(known[name])
        domain = self.domains[family][name]
        high = domain.high if domain.kind == "range" else max(domain.values())
        for constraint in FAMILY_CONSTRAINTS[family]:
            if constraint.lower == name:
                upper_max = self._max_value(family, constraint.upper, known)
                high = min(high, (upper_max - constraint.gap) / constraint.scale)
        if domain.kind == "range":
            high = domain.snap_interval(domain.low, high)[1]
        return float(high)

    def _repair_rounding(self, family: str, values: dict[str, Any]) -> None:
        # A step lattice recomputed from a moved lower bound can land one rounding error
        # below a non-strict bound (shift_max = shift_min - 1e-17): lift it onto the bound.
        for constraint in FAMILY_CONSTRAINTS[family]:
            if constraint.gap == 0:
                bound = constraint.scale * values[constraint.lower]
                if bound - _FLOAT_TOLERANCE <= values[constraint.upper] < bound:
                    values[constraint.upper] = bound

    def _check_domains(self) -> None:
        problems: list[tuple[str, Any, str]] = []
        for family in self.families:
            for name, domain in self.domains[family].items():
                if domain.kind != "range":
                    continue
                if domain.low > domain.high:
                    problems.append((f"schedule.{name}", domain.describe(),
                                     "low must not exceed high"))
                if domain.log and domain.low <= 0:
                    problems.append((f"schedule.{name}", domain.describe(),
                                     "a log range needs low > 0"))
                if domain.log and domain.step is not None and not domain.is_int:
                    problems.append((f"schedule.{name}", domain.describe(),
                                     "log and step cannot be combined"))
                if domain.step is not None and domain.step <= 0:
                    problems.append((f"schedule.{name}", domain.describe(),
                                     "step must be > 0"))
        if problems:
            raise SearchSpaceError(problems)

    def _check_feasible(self) -> None:
        """Check that every categorical combination leaves a valid interval per range."""
        problems: list[tuple[str, Any, str]] = []
        for family in self.families:
            domains = self.domains[family]
            discrete = [name for name, d in domains.items() if d.kind != "range"]
            ranges = [name for name, d in domains.items() if d.kind == "range"]
            axes = [domains[name].values() for name in discrete]
            for combination in itertools.islice(itertools.product(*axes), MAX_GRID_POINTS):
                known = dict(zip(discrete, combination, strict=True))
                problem = self._walk_ranges(family, known, ranges)
                if problem is not None:
                    problems.append(problem)
                    break
        if problems:
            raise SearchSpaceError(problems)

    def _walk_ranges(
        self, family: str, known: dict[str, Any], ranges: list[str]
    ) -> tuple[str, Any, str] | None:
        # Walk the ranges twice, once at their lowest and once at their highest allowed
        # values. The constraints are monotone, so these two paths bound every other one.
        for pick_high in (False, True):
            values = dict(known)
            for name in ranges:
                try:
                    low, high = self.bounds(family, name, values)
                except SearchSpaceError:
                    return self._infeasible(family, name, known)
                values[name] = high if pick_high else low
            violated = check_constraints(family, values)
            if violated:
                return self._infeasible(family, violated[0].upper, known)
        return None

    def _infeasible(self, family: str, name: str, known: Mapping[str, Any]) -> tuple[str, Any, str]:
        rules = "; ".join(c.describe() for c in FAMILY_CONSTRAINTS[family])
        condition = f" when {dict(known)}" if known else ""
        return (f"schedule.{name}", self.domains[family][name].describe(),
                f"family {family} has no valid value{condition}; its values must allow {rules}")


def check_constraints(family: str, params: Mapping[str, Any]) -> list[Constraint]:
    """Return the constraints of ``family`` that ``params`` breaks (empty when valid)."""
    return [
        constraint
        for constraint in FAMILY_CONSTRAINTS.get(family, ())
        if constraint.lower in params and constraint.upper in params
        and not constraint.holds(float(params[constraint.lower]), float(params[constraint.upper]))
    ]


def _clean_float(value: float) -> float:
    """Round away the last bits of float noise (``0.30000000000000004`` -> ``0.3``)."""
    return float(f"{value:.12g}")


def _point_label(family: str, params: Mapping[str, Any]) -> str:
    inner = ", ".join(f"{name}={value}" for name, value in params.items())
    return f"{family}({inner})"
