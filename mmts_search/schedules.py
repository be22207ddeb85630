"""Temperature and margin schedules for contrastive training.

A schedule maps an optimizer step and a batch of per-sample concept cluster sizes to
one positive temperature per sample. The same value serves as the per-anchor margin
when the loss is the max-margin hinge. Four families exist:

- ``constant``: a fixed temperature ``tau``.
- ``ts_cosine``: the uni-modal temperature schedule
  ``tau(t) = tau_min + 0.5 * (tau_max - tau_min) * (1 + cos(2*pi*t / T))``.
- ``mmts``: the multi-modal schedule ``tau_i(t) = 0.5 * alpha * cos(2*pi*t / T) +
  shift(c_i)``, where ``c_i`` is the size of sample ``i``'s concept cluster and the shift
  grows linearly from ``shift_min`` (rarest concept) to ``shift_max`` (most frequent).
- ``learnable``: CLIP's learned logit scale, the baseline without a schedule.

``T = total_steps / oscillations`` is the period in optimizer steps. Steps count
optimizer updates from 0.

Example:
    >>> import torch
    >>> schedule = make_schedule(
    ...     "mmts",
    ...     {"alpha": 0.1, "oscillations": 2, "shift_min": 0.08, "shift_max": 0.3},
    ...     total_steps=1000, min_count=2, max_count=3617,
    ... )
    >>> [round(tau, 4) for tau in schedule.temperature(0, torch.tensor([2, 3617])).tolist()]
    [0.13, 0.35]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "FAMILY_PARAMETERS",
    "SCHEDULE_FAMILIES",
    "ConstantSchedule",
    "LearnableSchedule",
    "MAX_LOGIT_SCALE",
    "MmtsSchedule",
    "Schedule",
    "TsCosineSchedule",
    "cluster_shift",
    "make_schedule",
    "mmts_base",
    "ts_cosine",
]

SCHEDULE_FAMILIES: tuple[str, ...] = ("constant", "ts_cosine", "mmts", "learnable")

FAMILY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "constant": ("tau",),
    "ts_cosine": ("tau_min", "tau_max", "oscillations"),
    "mmts": ("alpha", "oscillations", "shift_min", "shift_max"),
    "learnable": ("tau_init",),
}

# CLIP clips its learned logit scale at 100, so the learned temperature never drops
# below 0.01.
MAX_LOGIT_SCALE = 100.0


def ts_cosine(step: float, *, tau_min: float, tau_max: float, period_steps: float) -> float:
    """Compute the cosine temperature ``tau_min + 0.5*(tau_max - tau_min)*(1 + cos(2*pi*step/T))``.

    The value starts at ``tau_max`` at step 0, reaches ``tau_min`` at half a period and
    returns to ``tau_max`` after ``period_steps`` optimizer steps.

    Args:
        step: optimizer step (any real number, the schedule is periodic).
        tau_min: lowest temperature.
        tau_max: highest temperature.
        period_steps: period ``T`` in optimizer steps, > 0.

    Raises:
        ValueError: if ``period_steps`` is not a positive finite number.
    """
    _check_period(period_steps)
    cosine = math.cos(2.0 * math.pi * step / period_steps)
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + cosine)


def mmts_base(step: float, *, alpha: float, period_steps: float) -> float:
    """Compute the oscillating part of the MM-TS temperature, ``0.5*alpha*cos(2*pi*step/T)``.

    The value lies in ``[-alpha/2, alpha/2]``. Adding a per-sample cluster shift gives the
    temperature (see `cluster_shift`).

    Args:
        step: optimizer step (any real number, the schedule is periodic).
        alpha: peak-to-peak amplitude of the oscillation.
        period_steps: period ``T`` in optimizer steps, > 0.

    Raises:
        ValueError: if ``period_steps`` is not a positive finite number.
    """
    _check_period(period_steps)
    return 0.5 * alpha * math.cos(2.0 * math.pi * step / period_steps)


def cluster_shift(
    counts: torch.Tensor,
    *,
    min_count: float,
    max_count: float,
    min_shift: float,
    max_shift: float,
) -> torch.Tensor:
    """Map cluster sizes linearly onto temperature shifts, elementwise.

    ``shift(c) = (c - min_count) / (max_count - min_count) * (max_shift - min_shift) + min_shift``,
    so a sample of the largest cluster gets ``max_shift`` and one of the smallest gets
    ``min_shift``. Sizes outside ``[min_count, max_count]`` are extrapolated, not clamped.
    When ``max_count == min_count`` every sample gets ``(min_shift + max_shift) / 2``.

    Args:
        counts: cluster size of each sample, any shape (usually ``(B,)``), integer or
            floating point, on any device.
        min_count: smallest cluster size of the training split.
        max_count: largest cluster size of the training split, >= ``min_count``.
        min_shift: shift of the smallest cluster.
        max_shift: shift of the largest cluster.

    Returns:
        Shifts with the shape and device of ``counts``: float32, or the dtype of
        ``counts`` when that is floating point.

    Raises:
        ValueError: if ``max_count < min_count``.
    """
    if max_count < min_count:
        raise ValueError(
            f"max_count must be >= min_count ({min_count}), got {max_count}"
        )

    counts = torch.as_tensor(counts)
    dtype = counts.dtype if counts.is_floating_point() else torch.float32
    counts = counts.to(dtype)

    if max_count == min_count:
        return torch.full_like(counts, 0.5 * (min_shift + max_shift))

    slope = (max_shift - min_shift) / (max_count - min_count)
    return (counts - min_count) * slope + min_shift


@runtime_checkable
class Schedule(Protocol):
    """Interface of every schedule: a family name and a per-sample temperature.

    `LearnableSchedule` is also an ``nn.Module``. Its parameters must go to the optimizer.
    """

    family: str

    def temperature(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Return the ``(B,)`` float32 temperatures for ``step`` on the device of ``counts``."""
        ...


class ConstantSchedule:
    """Fixed temperature ``tau`` for every step and sample.

    Args:
        tau: temperature, > 0.
    """

    family = "constant"

    def __init__(self, *, tau: float) -> None:
        self.tau = _check_positive("tau", tau)

    def temperature(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Return ``tau`` for each of the ``(B,)`` samples, float32 on the device of ``counts``."""
        _check_counts(counts)
        return torch.full(counts.shape, self.tau, dtype=torch.float32, device=counts.device)

    def __repr__(self) -> str:
        return f"ConstantSchedule(tau={self.tau})"


class TsCosineSchedule:
    """Cosine temperature schedule shared by every sample (see `ts_cosine`).

    Args:
        tau_min: lowest temperature, > 0.
        tau_max: highest temperature, > ``tau_min``.
        oscillations: number of full periods in ``total_steps``, >= 1 (int or float).
        total_steps: optimizer steps of the whole training run, >= 1.
    """

    family = "ts_cosine"

    def __init__(
        self, *, tau_min: float, tau_max: float, oscillations: float, total_steps: int
    ) -> None:
        self.tau_min = _check_positive("tau_min", tau_min)
        self.tau_max = _check_finite("tau_max", tau_max)
        if not self.tau_max > self.tau_min:
            raise ValueError(
                f"tau_max must be greater than tau_min ({self.tau_min}), got {self.tau_max}"
            )
        self.oscillations = _check_oscillations(oscillations)
        self.total_steps = _check_total_steps(total_steps)
        self.period_steps = self.total_steps / self.oscillations

    def temperature(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Return the step's temperature for each of the ``(B,)`` samples, float32."""
        _check_counts(counts)
        tau = ts_cosine(
            step, tau_min=self.tau_min, tau_max=self.tau_max, period_steps=self.period_steps
        )
        return torch.full(counts.shape, tau, dtype=torch.float32, device=counts.device)

    def __repr__(self) -> str:
        return (
            f"TsCosineSchedule(tau_min={self.tau_min}, tau_max={self.tau_max}, "
            f"oscillations={self.oscillations}, total_steps={self.total_steps})"
        )


class MmtsSchedule:
    """Multi-modal temperature schedule: a shared cosine plus a per-sample cluster shift.

    ``tau_i(t) = 0.5 * alpha * cos(2*pi*t / T) + shift(c_i)`` with ``shift`` from
    `cluster_shift` and ``T = total_steps / oscillations``. Samples of frequent concepts
    get higher temperatures than samples of rare ones.

    Cluster sizes outside ``[min_count, max_count]`` (for example from a split other than
    the training split) are clamped into that range first. Without the clamp, a size
    below ``min_count`` would extrapolate below ``shift_min`` and could make the
    temperature zero or negative. With it, every temperature is at least
    ``shift_min - alpha/2``, which validation keeps positive.

    Args:
        alpha: peak-to-peak amplitude of the oscillation, >= 0.
        oscillations: number of full periods in ``total_steps``, >= 1 (int or float).
        shift_min: shift of the smallest training cluster, > ``alpha / 2``.
        shift_max: shift of the largest training cluster, >= ``shift_min``.
        total_steps: optimizer steps of the whole training run, >= 1.
        min_count: smallest cluster size over the training split, >= 0.
        max_count: largest cluster size over the training split, >= ``min_count``.
    """

    family = "mmts"

    def __init__(
        self,
        *,
        alpha: float,
        oscillations: float,
        shift_min: float,
        shift_max: float,
        total_steps: int,
        min_count: float,
        max_count: float,
    ) -> None:
        self.alpha = _check_finite("alpha", alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

        self.shift_min = _check_finite("shift_min", shift_min)
        if not self.shift_min > 0.5 * self.alpha:
            # The cosine reaches -alpha/2, so the rarest concept's temperature would hit
            # shift_min - alpha/2 <= 0 at half a period.
            raise ValueError(
                f"shift_min must be greater than alpha/2 ({0.5 * self.alpha}) so that every "
                f"temperature stays positive, got {self.shift_min}"
            )
        self.shift_max = _check_finite("shift_max", shift_max)
        if self.shift_max < self.shift_min:
            raise ValueError(
                f"shift_max must be >= shift_min ({self.shift_min}), got {self.shift_max}"
            )

        self.oscillations = _check_oscillations(oscillations)
        self.total_steps = _check_total_steps(total_steps)
        self.period_steps = self.total_steps / self.oscillations

        self.min_count = _check_finite("min_count", min_count)
        if self.min_count < 0:
            raise ValueError(f"min_count must be >= 0, got {self.min_count}")
        self.max_count = _check_finite("max_count", max_count)
        if self.max_count < self.min_count:
            raise ValueError(
                f"max_count must be >= min_count ({self.min_count}), got {self.max_count}"
            )

        # Precomputed so that each step runs only a few elementwise kernels on the counts.
        if self.max_count == self.min_count:
            self._slope = 0.0
            self._shift_at_min = 0.5 * (self.shift_min + self.shift_max)
        else:
            self._slope = (self.shift_max - self.shift_min) / (self.max_count - self.min_count)
            self._shift_at_min = self.shift_min

    def temperature(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Return the ``(B,)`` float32 temperatures of samples with cluster sizes ``counts``.

        Args:
            step: optimizer step.
            counts: ``(B,)`` cluster size of each sample (integer or float tensor).
        """
        _check_counts(counts)
        base = mmts_base(step, alpha=self.alpha, period_steps=self.period_steps)

        # After the clamp (c - min_count) * slope >= 0, and base + shift_min > 0 is added as
        # one float64 scalar, so the float32 sum stays positive (unless shift_min - alpha/2
        # is below the smallest float32, about 1e-45).
        offset = counts.to(torch.float32).clamp(self.min_count, self.max_count)
        offset = (offset - self.min_count).mul_(self._slope)
        return offset.add_(base + self._shift_at_min)

    def __repr__(self) -> str:
        return (
            f"MmtsSchedule(alpha={self.alpha}, oscillations={self.oscillations}, "
            f"shift_min={self.shift_min}, shift_max={self.shift_max}, "
            f"total_steps={self.total_steps}, min_count={self.min_count}, "
            f"max_count={self.max_count})"
        )


class LearnableSchedule(nn.Module):
    """CLIP's learned temperature: one trainable log logit scale shared by all samples.

    The temperature is ``1 / exp(log_logit_scale)``, initialised to ``tau_init``. As in
    CLIP, the logit scale is clipped at `MAX_LOGIT_SCALE` (100). Each call to
    `temperature` first clamps the parameter in place, so the temperature never drops
    below 0.01. The parameter then never stays beyond the clip, where its gradient
    would vanish. Add ``schedule.parameters()`` to the optimizer, and move the module to
    the training device with ``.to(device)``.

    Args:
        tau_init: initial temperature, >= 0.01 (``1 / MAX_LOGIT_SCALE``).
    """

    family = "learnable"

    def __init__(self, *, tau_init: float) -> None:
        super().__init__()
        self.tau_init = _check_positive("tau_init", tau_init)
        if self.tau_init < 1.0 / MAX_LOGIT_SCALE:
            raise ValueError(
                f"tau_init must be >= {1.0 / MAX_LOGIT_SCALE} because the logit scale is "
                f"clipped at {MAX_LOGIT_SCALE}, got {self.tau_init}"
            )
        self.log_logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / self.tau_init), dtype=torch.float32)
        )

    def temperature(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Return the learned temperature for each of the ``(B,)`` samples, float32.

        The result carries gradients to ``log_logit_scale``. ``step`` is ignored.
        """
        _check_counts(counts)
        with torch.no_grad():
            self.log_logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

        # exp and reciprocal save their outputs, not the parameter, for the backward pass,
        # so a later in-place clamp does not invalidate a graph built by this call.
        tau = torch.exp(self.log_logit_scale).reciprocal()
        return tau.to(device=counts.device, dtype=torch.float32).reshape(1).repeat(counts.shape[0])

    def extra_repr(self) -> str:
        return f"tau_init={self.tau_init}"


def make_schedule(
    family: str,
    params: Mapping[str, float],
    *,
    total_steps: int,
    min_count: float,
    max_count: float,
) -> Schedule:
    """Build the schedule of ``family`` from its parameters.

    Args:
        family: one of `SCHEDULE_FAMILIES`.
        params: exactly the family's parameters, as listed in `FAMILY_PARAMETERS`.
        total_steps: optimizer steps of the whole run (used by the cosine families).
        min_count: smallest cluster size over the training split (used by ``mmts``).
        max_count: largest cluster size over the training split (used by ``mmts``).

    Raises:
        ValueError: for an unknown family, missing or unexpected parameters, or a
            parameter outside its allowed range.
    """
    if family not in FAMILY_PARAMETERS:
        raise ValueError(
            f"unknown schedule family {family!r}; expected one of {', '.join(SCHEDULE_FAMILIES)}"
        )

    expected = FAMILY_PARAMETERS[family]
    missing = [name for name in expected if name not in params]
    unexpected = sorted(name for name in params if name not in expected)
    if missing or unexpected:
        raise ValueError(
            f"invalid parameters for schedule family {family!r}: missing {missing}, "
            f"unexpected {unexpected}; expected exactly {list(expected)}"
        )

    if family == "constant":
        return ConstantSchedule(tau=params["tau"])
    if family == "ts_cosine":
        return TsCosineSchedule(
            tau_min=params["tau_min"],
            tau_max=params["tau_max"],
            oscillations=params["oscillations"],
            total_steps=total_steps,
        )
    if family == "mmts":
        return MmtsSchedule(
            alpha=params["alpha"],
            oscillations=params["oscillations"],
            shift_min=params["shift_min"],
            shift_max=params["shift_max"],
            total_steps=total_steps,
            min_count=min_count,
            max_count=max_count,
        )
    return LearnableSchedule(tau_init=params["tau_init"])


def _check_finite(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _check_positive(name: str, value: float) -> float:
    number = _check_finite(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {number}")
    return number


def _check_oscillations(value: float) -> float:
    number = _check_finite("oscillations", value)
    if number < 1:
        raise ValueError(f"oscillations must be >= 1, got {number}")
    return number


def _check_total_steps(value: int) -> int:
    try:
        steps = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"total_steps must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or steps != value or steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {value!r}")
    return steps


def _check_period(period_steps: float) -> None:
    if not (math.isfinite(period_steps) and period_steps > 0):
        raise ValueError(f"period_steps must be a finite number > 0, got {period_steps}")


def _check_counts(counts: torch.Tensor) -> None:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
        shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts)
        raise ValueError(f"counts must be a 1-D tensor of shape (B,), got {shape}")
