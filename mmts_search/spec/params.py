"""Schedule parameter values (range, choices or fixed number) and each parameter's bound."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mmts_search.schedules import MAX_LOGIT_SCALE

from ._problems import _format_number, _show


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
