"""Tests of the temperature schedules and their parameter validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmts_search.concepts import read_class_counts
from mmts_search.schedules import (
    FAMILY_PARAMETERS,
    MAX_LOGIT_SCALE,
    SCHEDULE_FAMILIES,
    ConstantSchedule,
    LearnableSchedule,
    MmtsSchedule,
    Schedule,
    TsCosineSchedule,
    cluster_shift,
    make_schedule,
    mmts_base,
    ts_cosine,
)

MMTS_PARAMS = {"alpha": 0.1, "oscillations": 2, "shift_min": 0.08, "shift_max": 0.3}


def make_mmts(**overrides: float) -> MmtsSchedule:
    params = {**MMTS_PARAMS, "total_steps": 1000, "min_count": 2, "max_count": 3617}
    params.update(overrides)
    return MmtsSchedule(**params)


# --- formulas -------------------------------------------------------------------------


def test_ts_cosine_hand_values() -> None:
    kwargs = {"tau_min": 0.1, "tau_max": 0.5, "period_steps": 100}

    assert ts_cosine(0, **kwargs) == pytest.approx(0.5)
    assert ts_cosine(25, **kwargs) == pytest.approx(0.3)
    assert ts_cosine(50, **kwargs) == pytest.approx(0.1)
    assert ts_cosine(75, **kwargs) == pytest.approx(0.3)
    assert ts_cosine(100, **kwargs) == pytest.approx(0.5)


@pytest.mark.parametrize("step", [0, 7, 33, 50, 81.5])
def test_ts_cosine_is_periodic(step: float) -> None:
    kwargs = {"tau_min": 0.02, "tau_max": 0.2, "period_steps": 64}

    value = ts_cosine(step, **kwargs)

    assert ts_cosine(step + 64, **kwargs) == pytest.approx(value, abs=1e-12)
    assert ts_cosine(step + 3 * 64, **kwargs) == pytest.approx(value, abs=1e-12)


def test_mmts_base_hand_values() -> None:
    kwargs = {"alpha": 0.2, "period_steps": 10}

    assert mmts_base(0, **kwargs) == pytest.approx(0.1)
    assert mmts_base(2.5, **kwargs) == pytest.approx(0.0, abs=1e-12)
    assert mmts_base(5, **kwargs) == pytest.approx(-0.1)
    assert mmts_base(10, **kwargs) == pytest.approx(0.1)


@pytest.mark.parametrize("step", [0, 1, 3, 5, 8.25])
def test_mmts_base_is_periodic(step: float) -> None:
    kwargs = {"alpha": 0.3, "period_steps": 12.5}

    value = mmts_base(step, **kwargs)

    assert mmts_base(step + 12.5, **kwargs) == pytest.approx(value, abs=1e-12)
    assert mmts_base(step + 4 * 12.5, **kwargs) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("function", [ts_cosine, mmts_base])
@pytest.mark.parametrize("period", [0, -5, math.inf, math.nan])
def test_cosine_formulas_reject_bad_period(function, period: float) -> None:
    kwargs = (
        {"tau_min": 0.1, "tau_max": 0.2} if function is ts_cosine else {"alpha": 0.1}
    )

    with pytest.raises(ValueError, match="period_steps must be a finite number > 0"):
        function(3, period_steps=period, **kwargs)


def test_cluster_shift_hand_values() -> None:
    counts = torch.tensor([10, 20, 15, 12])

    shifts = cluster_shift(counts, min_count=10, max_count=20, min_shift=0.1, max_shift=0.3)

    assert shifts.dtype == torch.float32
    assert shifts.tolist() == pytest.approx([0.1, 0.3, 0.2, 0.14])


def test_cluster_shift_equal_counts_gives_mean() -> None:
    counts = torch.tensor([7, 7, 7])

    shifts = cluster_shift(counts, min_count=7, max_count=7, min_shift=0.1, max_shift=0.3)

    assert shifts.tolist() == pytest.approx([0.2, 0.2, 0.2])


def test_cluster_shift_keeps_float64() -> None:
    counts = torch.tensor([1.0, 3.0], dtype=torch.float64)

    shifts = cluster_shift(counts, min_count=1, max_count=3, min_shift=0.0, max_shift=1.0)

    assert shifts.dtype == torch.float64
    assert shifts.tolist() == [0.0, 1.0]


def test_cluster_shift_rejects_inverted_counts() -> None:
    with pytest.raises(ValueError, match=r"max_count must be >= min_count \(5\), got 4"):
        cluster_shift(torch.tensor([4]), min_count=5, max_count=4, min_shift=0.1, max_shift=0.2)


def test_cluster_shift_ek100_noun_endpoints(shared_data: Path) -> None:
    counts_by_class = read_class_counts(shared_data / "ek100" / "ek100_noun_freq.csv")
    min_count = min(counts_by_class.values())
    max_count = max(counts_by_class.values())
    assert (min_count, max_count) == (2, 3617)

    counts = torch.tensor(list(counts_by_class.values()))
    shifts = cluster_shift(
        counts, min_count=min_count, max_count=max_count, min_shift=0.05, max_shift=0.25
    )
    endpoints = cluster_shift(
        torch.tensor([3617, 2]), min_count=2, max_count=3617, min_shift=0.05, max_shift=0.25
    )

    assert endpoints.tolist() == pytest.approx([0.25, 0.05])
    assert float(shifts.min()) == pytest.approx(0.05)
    assert float(shifts.max()) == pytest.approx(0.25)
    assert bool((shifts >= 0.05 - 1e-7).all())


# --- schedule objects -----------------------------------------------------------------


def test_constant_schedule_values() -> None:
    schedule = ConstantSchedule(tau=0.07)

    taus = schedule.temperature(123, torch.tensor([1, 5, 9]))

    assert schedule.family == "constant"
    assert taus.dtype == torch.float32
    assert taus.shape == (3,)
    assert taus.tolist() == pytest.approx([0.07] * 3)


@pytest.mark.parametrize("tau", [0, -0.1, math.nan, math.inf])
def test_constant_schedule_rejects_bad_tau(tau: float) -> None:
    with pytest.raises(ValueError, match="tau must be"):
        ConstantSchedule(tau=tau)


def test_constant_schedule_error_names_value() -> None:
    with pytest.raises(ValueError, match=r"tau must be > 0, got -0.5"):
        ConstantSchedule(tau=-0.5)


def test_ts_cosine_schedule_follows_formula() -> None:
    schedule = TsCosineSchedule(tau_min=0.02, tau_max=0.1, oscillations=4, total_steps=400)
    counts = torch.tensor([3, 4])

    assert schedule.period_steps == 100
    for step in (0, 10, 50, 99, 100, 150, 399):
        expected = ts_cosine(step, tau_min=0.02, tau_max=0.1, period_steps=100)
        assert schedule.temperature(step, counts).tolist() == pytest.approx([expected] * 2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tau_min": 0.1, "tau_max": 0.1}, r"tau_max must be greater than tau_min \(0.1\)"),
        ({"tau_min": 0.2, "tau_max": 0.1}, r"tau_max must be greater than tau_min \(0.2\)"),
        ({"tau_min": 0.0}, r"tau_min must be > 0, got 0.0"),
        ({"tau_min": -0.01}, r"tau_min must be > 0, got -0.01"),
        ({"oscillations": 0.5}, r"oscillations must be >= 1, got 0.5"),
        ({"total_steps": 0}, r"total_steps must be an integer >= 1, got 0"),
        ({"total_steps": 10.5}, r"total_steps must be an integer >= 1, got 10.5"),
    ],
)
def test_ts_cosine_schedule_rejects_bad_params(params: dict, message: str) -> None:
    kwargs = {"tau_min": 0.02, "tau_max": 0.1, "oscillations": 2, "total_steps": 100}
    kwargs.update(params)

    with pytest.raises(ValueError, match=message):
        TsCosineSchedule(**kwargs)


def test_mmts_schedule_hand_values() -> None:
    schedule = MmtsSchedule(
        alpha=0.1,
        oscillations=2,
        shift_min=0.1,
        shift_max=0.3,
        total_steps=100,
        min_count=10,
        max_count=20,
    )
    counts = torch.tensor([10, 15, 20])

    # Period 50 steps: the cosine is +1 at step 0 and -1 at step 25.
    assert schedule.temperature(0, counts).tolist() == pytest.approx([0.15, 0.25, 0.35])
    assert schedule.temperature(25, counts).tolist() == pytest.approx([0.05, 0.15, 0.25])
    assert schedule.temperature(50, counts).tolist() == pytest.approx([0.15, 0.25, 0.35])


def test_mmts_schedule_matches_formula_functions() -> None:
    schedule = make_mmts()
    counts = torch.tensor([2, 40, 700, 3617])

    for step in (0, 125, 250, 333, 999):
        base = mmts_base(step, alpha=0.1, period_steps=500)
        shifts = cluster_shift(
            counts, min_count=2, max_count=3617, min_shift=0.08, max_shift=0.3
        )
        expected = (base + shifts).tolist()
        assert schedule.temperature(step, counts).tolist() == pytest.approx(expected, abs=1e-6)


def test_mmts_schedule_clamps_counts_outside_training_range() -> None:
    schedule = make_mmts()

    inside = schedule.temperature(250, torch.tensor([2, 3617]))
    outside = schedule.temperature(250, torch.tensor([0, 10_000]))

    assert outside.tolist() == pytest.approx(inside.tolist())
    assert bool((outside > 0).all())


def test_mmts_schedule_equal_counts_uses_mean_shift() -> None:
    schedule = make_mmts(min_count=5, max_count=5)

    taus = schedule.temperature(0, torch.tensor([5, 5]))

    assert taus.tolist() == pytest.approx([0.05 + 0.19] * 2)


def test_mmts_schedule_accepts_float_oscillations() -> None:
    schedule = make_mmts(oscillations=1.5)

    assert schedule.period_steps == pytest.approx(1000 / 1.5)


def test_mmts_output_device_and_dtype() -> None:
    schedule = make_mmts()
    counts = torch.tensor([2.0, 100.0], dtype=torch.float64)

    taus = schedule.temperature(3, counts)

    assert taus.dtype == torch.float32
    assert taus.device == counts.device


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": -0.1}, r"alpha must be >= 0, got -0.1"),
        (
            {"alpha": 0.2, "shift_min": 0.1},
            r"shift_min must be greater than alpha/2 \(0.1\) so that every temperature "
            r"stays positive, got 0.1",
        ),
        ({"alpha": 0.2, "shift_min": 0.05}, r"shift_min must be greater than alpha/2 \(0.1\)"),
        ({"shift_max": 0.05}, r"shift_max must be >= shift_min \(0.08\), got 0.05"),
        ({"oscillations": 0}, r"oscillations must be >= 1, got 0.0"),
        ({"oscillations": math.nan}, r"oscillations must be a finite number, got nan"),
        ({"total_steps": -3}, r"total_steps must be an integer >= 1, got -3"),
        ({"min_count": -1}, r"min_count must be >= 0, got -1.0"),
        ({"max_count": 1}, r"max_count must be >= min_count \(2.0\), got 1.0"),
    ],
)
def test_mmts_schedule_rejects_bad_params(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_mmts(**params)


def test_schedules_reject_2d_counts() -> None:
    schedule = ConstantSchedule(tau=0.1)

    message = r"counts must be a 1-D tensor of shape \(B,\), got \(2, 2\)"
    with pytest.raises(ValueError, match=message):
        schedule.temperature(0, torch.ones(2, 2))


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.floats(0.0, 2.0),
    gap=st.floats(1e-6, 1.0),
    spread=st.floats(0.0, 1.0),
    oscillations=st.integers(1, 8) | st.floats(1.0, 8.0),
    total_steps=st.integers(1, 5000),
    min_count=st.integers(1, 100),
    extra_count=st.integers(0, 5000),
)
def test_mmts_temperature_positive_over_period(
    alpha: float,
    gap: float,
    spread: float,
    oscillations: float,
    total_steps: int,
    min_count: int,
    extra_count: int,
) -> None:
    shift_min = alpha / 2 + gap
    schedule = MmtsSchedule(
        alpha=alpha,
        oscillations=oscillations,
        shift_min=shift_min,
        shift_max=shift_min + spread,
        total_steps=total_steps,
        min_count=min_count,
        max_count=min_count + extra_count,
    )
    counts = torch.tensor([min_count, min_count + extra_count // 2, min_count + extra_count])

    # 64 evenly spaced steps over one period, plus the exact minimum of the cosine.
    period = schedule.period_steps
    steps = [period * index / 64 for index in range(65)] + [period / 2]
    for step in steps:
        assert bool((schedule.temperature(step, counts) > 0).all())


@settings(max_examples=200, deadline=None)
@given(alpha=st.floats(0.0, 2.0), deficit=st.floats(0.0, 2.0))
def test_mmts_rejects_nonpositive_minimum(alpha: float, deficit: float) -> None:
    shift_min = alpha / 2 - deficit

    with pytest.raises(ValueError, match="shift_min must be greater than alpha/2"):
        MmtsSchedule(
            alpha=alpha,
            oscillations=2,
            shift_min=shift_min,
            shift_max=shift_min + 0.1,
            total_steps=100,
            min_count=1,
            max_count=10,
        )


# --- learnable ------------------------------------------------------------------------


def test_learnable_schedule_initial_value_and_gradient() -> None:
    schedule = LearnableSchedule(tau_init=0.07)
    counts = torch.tensor([1, 2, 3, 4])

    taus = schedule.temperature(0, counts)
    taus.sum().backward()

    assert isinstance(schedule, torch.nn.Module)
    assert taus.shape == (4,)
    assert taus.dtype == torch.float32
    assert taus.tolist() == pytest.approx([0.07] * 4, rel=1e-6)
    assert len(list(schedule.parameters())) == 1
    # d/dp of 4 * exp(-p) is -4 * tau.
    assert schedule.log_logit_scale.grad.item() == pytest.approx(-4 * 0.07, rel=1e-5)


def test_learnable_schedule_clamps_logit_scale_at_100() -> None:
    schedule = LearnableSchedule(tau_init=0.07)
    with torch.no_grad():
        schedule.log_logit_scale.fill_(math.log(400.0))

    taus = schedule.temperature(0, torch.tensor([1, 2]))

    assert taus.tolist() == pytest.approx([1 / MAX_LOGIT_SCALE] * 2, rel=1e-6)
    assert schedule.log_logit_scale.item() == pytest.approx(math.log(MAX_LOGIT_SCALE))


def test_learnable_schedule_two_calls_before_backward() -> None:
    schedule = LearnableSchedule(tau_init=0.1)
    counts = torch.tensor([1, 2])

    first = schedule.temperature(0, counts)
    second = schedule.temperature(1, counts)
    (first.sum() + second.sum()).backward()

    assert schedule.log_logit_scale.grad is not None
    assert math.isfinite(schedule.log_logit_scale.grad.item())


def test_learnable_schedule_optimizer_step_changes_tau() -> None:
    schedule = LearnableSchedule(tau_init=0.1)
    optimizer = torch.optim.SGD(schedule.parameters(), lr=0.1)
    counts = torch.tensor([1, 2])

    schedule.temperature(0, counts).sum().backward()
    optimizer.step()

    # The loss is the temperature itself, so gradient descent lowers it.
    assert schedule.temperature(1, counts)[0].item() < 0.1


@pytest.mark.parametrize(
    ("tau_init", "message"),
    [
        (0.0, r"tau_init must be > 0, got 0.0"),
        (0.005, r"tau_init must be >= 0.01 because the logit scale is clipped at 100.0, got 0.005"),
    ],
)
def test_learnable_schedule_rejects_bad_tau_init(tau_init: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearnableSchedule(tau_init=tau_init)


# --- factory --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "params", "cls"),
    [
        ("constant", {"tau": 0.05}, ConstantSchedule),
        ("ts_cosine", {"tau_min": 0.02, "tau_max": 0.1, "oscillations": 3}, TsCosineSchedule),
        ("mmts", MMTS_PARAMS, MmtsSchedule),
        ("learnable", {"tau_init": 0.07}, LearnableSchedule),
    ],
)
def test_make_schedule_builds_each_family(family: str, params: dict, cls: type) -> None:
    schedule = make_schedule(family, params, total_steps=300, min_count=2, max_count=50)

    assert isinstance(schedule, cls)
    assert isinstance(schedule, Schedule)
    assert schedule.family == family
    assert tuple(sorted(params)) == tuple(sorted(FAMILY_PARAMETERS[family]))
    taus = schedule.temperature(10, torch.tensor([2, 20, 50]))
    assert taus.shape == (3,)
    assert bool((taus > 0).all())


def test_families_and_parameter_tables_agree() -> None:
    assert SCHEDULE_FAMILIES == ("constant", "ts_cosine", "mmts", "learnable")
    assert set(FAMILY_PARAMETERS) == set(SCHEDULE_FAMILIES)


def test_make_schedule_ignores_counts_for_constant() -> None:
    schedule = make_schedule("constant", {"tau": 0.1}, total_steps=1, min_count=9, max_count=0)

    assert schedule.temperature(0, torch.tensor([3])).tolist() == pytest.approx([0.1])


def test_make_schedule_passes_counts_to_mmts() -> None:
    schedule = make_schedule("mmts", MMTS_PARAMS, total_steps=1000, min_count=2, max_count=3617)

    assert isinstance(schedule, MmtsSchedule)
    assert (schedule.min_count, schedule.max_count) == (2, 3617)


def test_make_schedule_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule family 'cosine'; expected one of"):
        make_schedule("cosine", {}, total_steps=10, min_count=1, max_count=2)


def test_make_schedule_rejects_missing_and_extra_params() -> None:
    with pytest.raises(ValueError, match=r"missing \['tau_max'\], unexpected \['tau'\]"):
        make_schedule(
            "ts_cosine",
            {"tau_min": 0.1, "oscillations": 1, "tau": 0.2},
            total_steps=10,
            min_count=1,
            max_count=2,
        )


def test_make_schedule_validates_values() -> None:
    with pytest.raises(ValueError, match="shift_min must be greater than alpha/2"):
        make_schedule(
            "mmts",
            {**MMTS_PARAMS, "alpha": 0.4},
            total_steps=100,
            min_count=1,
            max_count=10,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", SCHEDULE_FAMILIES)
def test_schedules_on_cuda(family: str) -> None:
    params = {
        "constant": {"tau": 0.05},
        "ts_cosine": {"tau_min": 0.02, "tau_max": 0.1, "oscillations": 3},
        "mmts": MMTS_PARAMS,
        "learnable": {"tau_init": 0.07},
    }[family]
    schedule = make_schedule(family, params, total_steps=300, min_count=2, max_count=50)
    if isinstance(schedule, torch.nn.Module):
        schedule.to("cuda")
    counts = torch.tensor([2, 20, 50], device="cuda")

    taus = schedule.temperature(10, counts)

    assert taus.device.type == "cuda"
    assert taus.dtype == torch.float32
    assert bool((taus > 0).all())
