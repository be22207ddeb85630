"""Domains of schedule parameters, the constraints between them, and their valid points."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mmts_search.schedules import FAMILY_PARAMETERS, SCHEDULE_FAMILIES

from ._problems import _format_number, _show
from .constants import INTEGER_PARAMETERS
from .params import _VALUE_RULES, RangeParam

# The models module imports this one, so the model classes serve as type hints only.
if TYPE_CHECKING:
    from .models import ScheduleSpace, SweepSpec


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
