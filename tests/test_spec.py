"""Tests of the sweep-file models: shipped files, malformed files, overrides, fixed points."""

from __future__ import annotations

import logging
import math
import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mmts_search.schedules import FAMILY_PARAMETERS, SCHEDULE_FAMILIES
from mmts_search.spec import (
    DatasetSpec,
    Problem,
    RangeParam,
    ScheduleSpace,
    SweepSpec,
    SweepValidationError,
    apply_overrides,
    check_resources,
    dump_sweep,
    feasible_param,
    grid_size,
    load_sweep,
    midpoint_params,
    parse_sweep,
    point_violations,
    trial_spec,
)

SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SHIPPED_FILES = sorted(SEARCH_SPACES.glob("*.yaml"))
EXPECTED_FILES = {
    "demo.yaml",
    "mmts_infonce.yaml",
    "mmts_max_margin.yaml",
    "baselines.yaml",
    "multi_dataset.yaml",
    "gpu_cluster.yaml",
}

MINIMAL = """\
name: t
datasets:
  - {name: d, source: "builtin:digits-lt"}
"""

TWO_DATASETS = """\
name: t
datasets:
  - {name: digits, source: "builtin:digits-lt"}
  - {name: synthetic, source: "builtin:synthetic-lt"}
"""


def sweep(extra: str = "", base: str = MINIMAL) -> str:
    """Return a minimal valid sweep file followed by ``extra`` (dedented)."""
    return base + textwrap.dedent(extra)


def problems_of(text: str, overrides: tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(SweepValidationError) as info:
        parse_sweep(text, source="bad.yaml", overrides=overrides)
    return info.value.problems


def assert_problem(problems: list[Problem], path: str, fragment: str) -> None:
    at_path = [problem for problem in problems if problem.path == path]
    listing = "\n".join(str(problem) for problem in problems)
    assert at_path, f"no problem at {path!r}; problems:\n{listing}"
    assert any(fragment.lower() in problem.message.lower() for problem in at_path), (
        f"no problem at {path!r} mentions {fragment!r}; problems:\n{listing}"
    )


# Each case: a sweep file and the (key path, message fragment) pairs it must produce.
MALFORMED = [
    pytest.param(
        "name: t\ndatasets:\n  - {name: d, source: builtin:digits-lt\ntraining: {epochs: 2}\n",
        [("", "line 4"), ("", "starts at line 3")],
        id="yaml-syntax-line-number",
    ),
    pytest.param(
        "name: t\ndatasets:\n\t- {name: d}\n",
        [("", "line 3"), ("", "tabs")],
        id="yaml-tab-indentation",
    ),
    pytest.param("# only a comment\n", [("", "empty")], id="empty-file"),
    pytest.param("- name: t\n", [("", "must be a mapping")], id="top-level-list"),
    pytest.param(
        sweep("training:\n  epochs: 3\n  epochs: 4\n"),
        [("training.epochs", "duplicate key 'epochs', first at line 5")],
        id="duplicate-yaml-key",
    ),
    pytest.param(
        sweep("traning: {epochs: 3}\n"),
        [("traning", "did you mean 'training'")],
        id="unknown-key-suggestion",
    ),
    pytest.param(
        sweep("search: {algoritm: tpe}\n"),
        [("search.algoritm", "did you mean 'algorithm'")],
        id="unknown-nested-key",
    ),
    pytest.param(
        sweep("epochs: 3\n"),
        [("epochs", "belongs under training")],
        id="key-in-wrong-section",
    ),
    pytest.param(
        sweep("schedule: {tau: {lo: 0.01, high: 0.3}}\n"),
        [("schedule.tau.lo", "did you mean 'low'"), ("schedule.tau.low", "missing")],
        id="unknown-range-key",
    ),
    pytest.param(
        "datasets:\n  - {name: d, source: features, path: x}\n",
        [("name", "required key 'name' is missing")],
        id="missing-name",
    ),
    pytest.param(
        sweep("training: {epochs: eight}\n"),
        [("training.epochs", "expected a whole number, got 'eight'")],
        id="wrong-type-int",
    ),
    pytest.param(
        sweep("name: 123\n", base="datasets: [{name: d, source: 'builtin:digits-lt'}]\n"),
        [("name", "expected text")],
        id="wrong-type-text",
    ),
    pytest.param(
        sweep("schedule: {tau: fast}\n"),
        [("schedule.tau", "a list of choices")],
        id="wrong-type-param",
    ),
    pytest.param(
        sweep("loss: infonc\n"),
        [("loss", "did you mean 'infonce'")],
        id="unknown-loss",
    ),
    pytest.param(
        sweep("schedule: {tau: {low: 0.3, high: 0.03}}\n"),
        [("schedule.tau", "reversed range")],
        id="reversed-range",
    ),
    pytest.param(
        sweep("schedule: {tau: {low: 0.1, high: 0.1}}\n"),
        [("schedule.tau", "use a fixed value")],
        id="empty-range",
    ),
    pytest.param(
        sweep("schedule: {tau: {low: 0.0, high: 0.3, log: true}}\n"),
        [("schedule.tau.low", "log range needs low > 0")],
        id="log-range-low-zero",
    ),
    pytest.param(
        sweep("schedule: {tau: {low: 0.05, high: 0.3, step: 0.1}}\n"),
        [("schedule.tau.high", "not on the grid")],
        id="range-high-off-step-grid",
    ),
    pytest.param(
        sweep("schedule: {tau: {low: -0.1, high: 0.3}}\n"),
        [("schedule.tau.low", "must be positive")],
        id="negative-temperature",
    ),
    pytest.param(
        sweep("schedule: {families: [constant], tau: 0}\n"),
        [("schedule.tau", "must be positive")],
        id="zero-fixed-temperature",
    ),
    pytest.param(
        sweep(
            """\
            schedule:
              families: [ts_cosine]
              tau_min: {low: 0.5, high: 0.9}
              tau_max: {low: 0.1, high: 0.4}
            """
        ),
        [("schedule.tau_min.low", "tau_min < tau_max")],
        id="tau-min-above-tau-max",
    ),
    pytest.param(
        sweep(
            """\
            schedule:
              families: [mmts]
              alpha: {low: 0.2, high: 0.4}
              shift_min: {low: 0.02, high: 0.1}
            """
        ),
        [("schedule.shift_min.high", "shift_min > alpha/2")],
        id="shift-min-below-half-alpha",
    ),
    pytest.param(
        sweep(
            """\
            schedule:
              families: [mmts]
              shift_min: {low: 0.3, high: 0.4}
              shift_max: {low: 0.1, high: 0.2}
            """
        ),
        [("schedule.shift_max.high", "shift_max >= shift_min")],
        id="shift-max-below-shift-min",
    ),
    pytest.param(
        sweep("schedule: {oscillations: {low: 1.5, high: 4}}\n"),
        [("schedule.oscillations.low", "whole numbers")],
        id="fractional-oscillations",
    ),
    pytest.param(
        sweep("schedule: {tau_init: 0.005}\n"),
        [("schedule.tau_init", "at least 0.01")],
        id="tau-init-below-clip",
    ),
    pytest.param(
        sweep("schedule: {families: [constant, cosine, mmts]}\n"),
        [("schedule.families.1", "did you mean 'ts_cosine'")],
        id="unknown-family",
    ),
    pytest.param(
        sweep("schedule: {families: []}\n"),
        [("schedule.families", "list of families is empty")],
        id="empty-families",
    ),
    pytest.param(
        sweep("loss: max_margin\nschedule: {families: [constant, learnable]}\n"),
        [("schedule.families", "applies only to loss: infonce")],
        id="learnable-with-max-margin",
    ),
    pytest.param(
        sweep("training: {epochs: 0}\n"),
        [("training.epochs", "at least 1, got 0")],
        id="zero-epochs",
    ),
    pytest.param(
        sweep("search: {num_samples: 0}\n"),
        [("search.num_samples", "at least 1, got 0")],
        id="zero-samples",
    ),
    pytest.param(
        sweep("objective: {metric: rsumm}\n"),
        [("objective.metric", "did you mean 'rsum'")],
        id="unknown-metric",
    ),
    pytest.param(
        sweep("objective: {metric: d/rsum}\n"),
        [("objective.metric", "several datasets")],
        id="dataset-prefix-single-dataset",
    ),
    pytest.param(
        sweep("objective: {metric: digitz/rsum}\n", base=TWO_DATASETS),
        [("objective.metric", "no dataset is named 'digitz'")],
        id="dataset-prefix-unknown-dataset",
    ),
    pytest.param(
        sweep(
            "objective: {metric: [rsum, tail_rsum], mode: [max]}\n"
            "search: {algorithm: nsga2}\npruner: {kind: none}\n"
        ),
        [("objective.mode", "one direction per metric")],
        id="mode-count-mismatch",
    ),
    pytest.param(
        sweep("search: {algorithm: nsga2}\npruner: {kind: none}\n"),
        [("objective.metric", "at least two metrics")],
        id="nsga2-one-metric",
    ),
    pytest.param(
        sweep("objective: {metric: [rsum, tail_rsum]}\n"),
        [("objective.metric", "exactly one metric"), ("pruner.kind", "pruner.kind: none")],
        id="tpe-two-metrics",
    ),
    pytest.param(
        sweep("search: {algorithm: grid}\nschedule: {families: [constant]}\n"),
        [("schedule.tau", "grid sampler")],
        id="grid-continuous-range",
    ),
    pytest.param(
        sweep(
            """\
            search: {algorithm: grid}
            schedule:
              families: [mmts]
              alpha: [0.0, 0.2]
              oscillations: 2
              shift_min: [0.05, 0.2]
              shift_max: 0.3
            """
        ),
        [("schedule.families", "alpha=0.2, shift_min=0.05")],
        id="grid-combination-breaks-constraint",
    ),
    pytest.param(
        sweep(
            """\
            datasets:
              - {name: d, source: "builtin:digits-lt"}
              - {name: d, source: "builtin:synthetic-lt"}
            """,
            base="name: t\n",
        ),
        [("datasets.1.name", "duplicate dataset name 'd'")],
        id="duplicate-dataset-names",
    ),
    pytest.param(
        sweep("resources: {gpu: 1.5}\n"),
        [("resources.gpu", "fraction in (0, 1]")],
        id="gpu-fraction-above-one",
    ),
    pytest.param(
        sweep("training: {device: cuda}\n"),
        [("training.device", "resources.gpu is 0")],
        id="cuda-without-gpu",
    ),
    pytest.param(
        sweep("pruner: {kind: wilcoxon}\n"),
        [("pruner.kind", "at least two datasets")],
        id="wilcoxon-one-dataset",
    ),
    pytest.param(
        sweep("pruner: {grace_epochs: 8}\ntraining: {epochs: 8}\n"),
        [("pruner.grace_epochs", "below training.epochs")],
        id="grace-epochs-not-below-epochs",
    ),
    pytest.param(
        "name: t\ndatasets:\n  - {name: f, source: features}\n",
        [("datasets.0.path", "needs path")],
        id="features-without-path",
    ),
    pytest.param(
        "name: t\ndatasets:\n  - {name: f, source: features, path: s3://bucket/x, concepts: "
        "{kind: captions}}\n",
        [("datasets.0.concepts.path", "needs a path")],
        id="caption-concepts-without-path",
    ),
    pytest.param(
        "name: t\ndatasets:\n  - {name: f, source: features, path: 'gs://bucket/x'}\n",
        [("datasets.0.path", "unsupported scheme 'gs'")],
        id="features-unsupported-url",
    ),
    pytest.param(
        "name: t\ndatasets:\n  - {name: d, source: 'builtin:digits-lt', n_concepts: 10}\n",
        [("datasets.0.n_concepts", "applies only to source 'builtin:synthetic-lt'")],
        id="field-of-other-source",
    ),
    pytest.param(
        "name: t\ndatasets:\n  - {name: a/b, source: 'builtin:digits-lt'}\n",
        [("datasets.0.name", "'/' is not allowed")],
        id="dataset-name-with-slash",
    ),
    pytest.param(
        sweep("model: {kind: factory, factory: my_models.build}\n"),
        [("model.factory", "package.module:function")],
        id="factory-without-function",
    ),
    pytest.param(
        sweep("tracking: {uri: 'sqlite://mlflow.db'}\n"),
        [("tracking.uri", "three slashes")],
        id="sqlite-uri-two-slashes",
    ),
    pytest.param(
        sweep("tracking: {register_model: mmts}\n"),
        [("tracking.register_model", "log_model: true")],
        id="register-without-log-model",
    ),
    pytest.param(
        sweep("storage: 'ftp://host/results'\n"),
        [("storage", "unsupported scheme 'ftp'")],
        id="storage-unsupported-url",
    ),
    pytest.param(
        sweep(
            """\
            traning: {epochs: 3}
            training: {epochs: 0}
            schedule:
              families: [constant, ts_cosine, mmts]
              tau: {low: 0.3, high: 0.03}
              tau_min: {low: 0.5, high: 0.9}
              tau_max: [0.2, 0.4]
              alpha: {low: 0.2, high: 0.4}
              shift_min: {low: 0.02, high: 0.05}
            search: {num_samples: 0}
            objective: {metric: rsumm}
            resources: {gpu: 1.5}
            """
        ),
        [
            ("traning", "did you mean 'training'"),
            ("training.epochs", "at least 1"),
            ("schedule.tau", "reversed range"),
            ("search.num_samples", "at least 1"),
            ("objective.metric", "did you mean 'rsum'"),
            ("resources.gpu", "fraction"),
        ],
        id="several-problems-at-once",
    ),
    pytest.param(
        sweep(
            """\
            schedule:
              families: [constant, ts_cosine, mmts]
              tau: {low: 0.0, high: 0.3}
              tau_min: {low: 0.5, high: 0.9}
              tau_max: [0.2, 0.4]
              alpha: {low: 0.2, high: 0.4}
              shift_min: {low: 0.02, high: 0.05}
            """
        ),
        [
            ("schedule.tau.low", "must be positive"),
            ("schedule.tau_min.low", "tau_min < tau_max"),
            ("schedule.shift_min.high", "shift_min > alpha/2"),
        ],
        id="several-schedule-problems-at-once",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_sweep_reports(text: str, expected: list[tuple[str, str]]) -> None:
    problems = problems_of(text)
    for path, fragment in expected:
        assert_problem(problems, path, fragment)


def test_malformed_table_is_large() -> None:
    assert len(MALFORMED) >= 15


# --- shipped files -----------------------------------------------------------------------


def test_shipped_files_present() -> None:
    assert {path.name for path in SHIPPED_FILES} == EXPECTED_FILES


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda path: path.name)
def test_shipped_file_validates(path: Path) -> None:
    spec = load_sweep(path)

    assert spec.name
    assert path.read_text(encoding="utf-8").startswith("#")


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda path: path.name)
def test_shipped_file_dump_round_trip(path: Path) -> None:
    spec = load_sweep(path)

    assert parse_sweep(dump_sweep(spec)) == spec
    assert SweepSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda path: path.name)
def test_shipped_midpoints_valid(path: Path) -> None:
    spec = load_sweep(path)
    for family in spec.schedule.families:
        params = midpoint_params(spec, family)

        assert point_violations(family, params) == [], (family, params)
        assert set(params) == set(FAMILY_PARAMETERS[family])


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda path: path.name)
def test_shipped_trial_spec_round_trip(path: Path) -> None:
    spec = load_sweep(path)
    for family in spec.schedule.families:
        params = midpoint_params(spec, family)
        fixed = trial_spec(spec, family, params)

        assert fixed.schedule.families == [family]
        for name, value in params.items():
            assert getattr(fixed.schedule, name) == value
        assert midpoint_params(fixed, family) == params
        assert parse_sweep(dump_sweep(fixed)) == fixed


def test_demo_matches_documented_example() -> None:
    spec = load_sweep(SEARCH_SPACES / "demo.yaml")

    assert spec.schedule.families == ["constant", "ts_cosine", "mmts"]
    assert spec.search.num_samples == 16
    assert spec.training.epochs == 8
    assert spec.resources.gpu == 0


def test_baselines_budget_equal_per_family() -> None:
    spec = load_sweep(SEARCH_SPACES / "baselines.yaml")
    sizes = {}
    for family in spec.schedule.families:
        single = trial_spec(spec, family, midpoint_params(spec, family))
        single_space = spec.schedule.model_copy(update={"families": [family]})
        sizes[family] = grid_size(single_space)
        assert single.schedule.families == [family]

    assert set(spec.schedule.families) == set(SCHEDULE_FAMILIES)
    assert len(set(sizes.values())) == 1, sizes
    assert grid_size(spec.schedule) == spec.search.num_samples


# --- overrides ---------------------------------------------------------------------------


def test_override_nested_key() -> None:
    spec = parse_sweep(MINIMAL, overrides=["training.epochs=3", "search.algorithm=random"])

    assert spec.training.epochs == 3
    assert spec.search.algorithm == "random"


def test_override_list_index() -> None:
    spec = parse_sweep(MINIMAL, overrides=["datasets.0.imbalance_ratio=20"])

    assert spec.datasets[0].imbalance_ratio == 20


def test_override_values_parsed_as_yaml() -> None:
    spec = parse_sweep(
        MINIMAL,
        overrides=[
            "schedule.families=[mmts, constant]",
            "schedule.tau={low: 0.05, high: 0.2, log: true}",
            "schedule.oscillations=3",
            "training.lr=1e-3",
            "training.save_model=true",
        ],
    )

    assert spec.schedule.families == ["mmts", "constant"]
    assert spec.schedule.tau == RangeParam(low=0.05, high=0.2, log=True)
    assert spec.schedule.oscillations == 3
    assert isinstance(spec.schedule.oscillations, int)
    assert spec.training.lr == pytest.approx(0.001)
    assert spec.training.save_model is True


def test_override_missing_section_starts_from_defaults() -> None:
    spec = parse_sweep(MINIMAL, overrides=["schedule.tau.low=0.05"])

    assert spec.schedule.tau == RangeParam(low=0.05, high=0.3, log=True)


def test_override_unknown_key_names_closest() -> None:
    problems = problems_of(MINIMAL, overrides=("training.epoch=3",))

    assert_problem(problems, "training.epoch", "did you mean 'epochs'")


def test_override_unknown_section_names_closest() -> None:
    problems = problems_of(MINIMAL, overrides=("traning.epochs=3",))

    assert_problem(problems, "traning.epochs", "did you mean 'training'")


def test_override_index_out_of_range() -> None:
    problems = problems_of(MINIMAL, overrides=("datasets.2.name=x",))

    assert_problem(problems, "datasets.2.name", "out of range")


def test_override_into_fixed_value() -> None:
    problems = problems_of(MINIMAL, overrides=("schedule.tau=0.1", "schedule.tau.low=0.2"))

    assert_problem(problems, "schedule.tau.low", "single value 0.1")


def test_override_without_equals_sign() -> None:
    problems = problems_of(MINIMAL, overrides=("training.epochs",))

    assert_problem(problems, "training.epochs", "key.path=value")


def test_override_invalid_value_is_validated() -> None:
    problems = problems_of(MINIMAL, overrides=("training.epochs=0",))

    assert_problem(problems, "training.epochs", "at least 1")
    assert all(problem.line is None for problem in problems)


def test_apply_overrides_leaves_input_unchanged() -> None:
    data: dict[str, Any] = {"name": "t", "training": {"epochs": 2}}

    result = apply_overrides(data, ["training.epochs=5", "model.factory_kwargs.depth=2"])

    assert result["training"]["epochs"] == 5
    assert result["model"]["factory_kwargs"] == {"depth": 2}
    assert data == {"name": "t", "training": {"epochs": 2}}


def test_failed_override_changes_nothing() -> None:
    problems = problems_of("name: t\n", overrides=("datasets.0.name=x",))

    assert_problem(problems, "datasets.0.name", "out of range")
    assert_problem(problems, "datasets", "required key 'datasets' is missing")


def test_apply_overrides_raises_for_unknown_key() -> None:
    with pytest.raises(SweepValidationError) as info:
        apply_overrides({"name": "t"}, ["objectiv.metric=rsum"])

    assert_problem(info.value.problems, "objectiv.metric", "did you mean 'objective'")


# --- error reporting ---------------------------------------------------------------------


def test_problems_carry_line_numbers() -> None:
    text = sweep("training:\n  lr: 0.01\n  epochs: 0\n")

    problems = problems_of(text)

    assert [(problem.path, problem.line) for problem in problems] == [("training.epochs", 6)]


def test_error_text_lists_every_problem() -> None:
    text = sweep("training: {epochs: 0}\nsearch: {num_samples: 0}\n")

    with pytest.raises(SweepValidationError) as info:
        parse_sweep(text, source="bad.yaml")
    message = str(info.value)

    assert message.startswith("Invalid sweep file bad.yaml (2 problems):")
    assert "training.epochs (line 4): Must be at least 1, got 0." in message
    assert "search.num_samples (line 5): Must be at least 1, got 0." in message


def test_problem_holds_bad_value() -> None:
    problems = problems_of(sweep("schedule: {tau: {low: 0.0, high: 0.3, log: true}}\n"))

    assert problems[0].value == 0.0


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SweepValidationError) as info:
        load_sweep(tmp_path / "absent.yaml")

    assert_problem(info.value.problems, "", "does not exist")


def test_load_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(MINIMAL, encoding="utf-8")

    spec = load_sweep(path, overrides=["training.epochs=2"])

    assert spec.training.epochs == 2


def test_exponent_without_dot_is_float() -> None:
    spec = parse_sweep(sweep("training: {lr: 1e-3, weight_decay: 5E-2}\n"))

    assert spec.training.lr == pytest.approx(0.001)
    assert spec.training.weight_decay == pytest.approx(0.05)


def test_direct_construction_raises() -> None:
    with pytest.raises(ValidationError, match="needs path"):
        DatasetSpec(name="f", source="features")
    with pytest.raises(ValidationError, match="tau_min < tau_max"):
        ScheduleSpace(tau_min=RangeParam(low=0.5, high=0.9), tau_max=[0.1, 0.2])
    with pytest.raises(ValidationError, match="wilcoxon"):
        SweepSpec.model_validate(
            {
                "name": "t",
                "datasets": [{"name": "d", "source": "features", "path": "/data"}],
                "pruner": {"kind": "wilcoxon"},
            }
        )


def test_lower_is_better_metric_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmts_search.spec"):
        parse_sweep(sweep("objective: {metric: loss, mode: max}\n"))

    assert "lower-is-better" in caplog.text


def test_schedule_fields_match_families() -> None:
    fields = set(ScheduleSpace.model_fields) - {"families"}
    parameters = {name for names in FAMILY_PARAMETERS.values() for name in names}

    assert fields == parameters
    assert set(FAMILY_PARAMETERS) == set(SCHEDULE_FAMILIES)


# --- fixed points and constraints --------------------------------------------------------


def test_midpoint_respects_constraints() -> None:
    spec = parse_sweep(
        sweep("schedule: {alpha: {low: 0.0, high: 0.4}, shift_min: {low: 0.02, high: 0.1}}\n")
    )

    params = midpoint_params(spec, "mmts")

    # alpha is narrowed to [0, 0.2) so that shift_min (at most 0.1) can exceed alpha/2.
    assert params["alpha"] == pytest.approx(0.1)
    assert params["shift_min"] == pytest.approx(0.075)
    assert point_violations("mmts", params) == []


def test_midpoint_geometric_for_log_ranges() -> None:
    spec = parse_sweep(sweep("schedule: {tau: {low: 0.01, high: 1.0, log: true}}\n"))

    assert midpoint_params(spec, "constant") == {"tau": pytest.approx(0.1)}


def test_midpoint_oscillations_is_int() -> None:
    spec = parse_sweep(MINIMAL)

    params = midpoint_params(spec, "ts_cosine")

    assert isinstance(params["oscillations"], int)


def test_midpoint_unknown_family() -> None:
    with pytest.raises(ValueError, match="Unknown schedule family"):
        midpoint_params(parse_sweep(MINIMAL), "cosine")


def test_trial_spec_accepts_trial_config() -> None:
    spec = parse_sweep(MINIMAL)
    config = {
        "family": "mmts",
        "alpha": 0.1,
        "oscillations": 2.0,
        "shift_min": 0.08,
        "shift_max": 0.3,
        "optuna_trial_number": 3,
    }

    fixed = trial_spec(spec, "mmts", config)

    assert fixed.schedule.families == ["mmts"]
    assert fixed.schedule.oscillations == 2
    assert isinstance(fixed.schedule.oscillations, int)
    assert fixed.schedule.shift_min == 0.08


def test_trial_spec_rejects_invalid_point() -> None:
    spec = parse_sweep(MINIMAL)
    params = {"alpha": 0.2, "oscillations": 2, "shift_min": 0.1, "shift_max": 0.3}

    with pytest.raises(ValueError, match="shift_min > alpha/2"):
        trial_spec(spec, "mmts", params)


def test_trial_spec_rejects_family_mismatch() -> None:
    with pytest.raises(ValueError, match="not 'constant'"):
        trial_spec(parse_sweep(MINIMAL), "constant", {"family": "mmts", "tau": 0.1})


def test_trial_spec_rejects_missing_parameter() -> None:
    with pytest.raises(ValueError, match="tau_max"):
        trial_spec(parse_sweep(MINIMAL), "ts_cosine", {"tau_min": 0.05, "oscillations": 2})


def test_point_violations_lists_each_rule() -> None:
    violations = point_violations(
        "ts_cosine", {"tau_min": 0.5, "tau_max": 0.2, "oscillations": 1.5, "extra": 1}
    )

    assert any("does not use extra" in violation for violation in violations)
    assert any("whole number" in violation for violation in violations)
    assert any("tau_min < tau_max" in violation for violation in violations)


def test_feasible_param_narrows_shift_min() -> None:
    schedule = ScheduleSpace()

    narrowed = feasible_param(schedule, "mmts", "shift_min", {"alpha": 0.2})

    assert isinstance(narrowed, RangeParam)
    assert narrowed.low > 0.1
    assert narrowed.high == 0.2


def test_feasible_param_filters_choices() -> None:
    schedule = ScheduleSpace(tau_min=[0.05, 0.1, 0.3], tau_max=[0.2, 0.4])

    assert feasible_param(schedule, "ts_cosine", "tau_max", {"tau_min": 0.3}) == 0.4
    assert feasible_param(schedule, "ts_cosine", "tau_min") == [0.05, 0.1, 0.3]


def test_feasible_param_looks_ahead() -> None:
    schedule = ScheduleSpace(
        alpha=RangeParam(low=0.0, high=0.5), shift_min=RangeParam(low=0.02, high=0.1)
    )

    narrowed = feasible_param(schedule, "mmts", "alpha")

    assert isinstance(narrowed, RangeParam)
    assert narrowed.high < 0.2
    assert narrowed.high == pytest.approx(0.2)


def test_feasible_param_keeps_step_grid() -> None:
    schedule = ScheduleSpace(shift_min=RangeParam(low=0.02, high=0.2, step=0.02))

    narrowed = feasible_param(schedule, "mmts", "shift_min", {"alpha": 0.1})

    assert isinstance(narrowed, RangeParam)
    assert narrowed.low == pytest.approx(0.06)
    assert narrowed.step == 0.02


def test_feasible_param_raises_when_nothing_left() -> None:
    schedule = ScheduleSpace(shift_min=RangeParam(low=0.02, high=0.2))

    with pytest.raises(ValueError, match="No value of shift_min"):
        feasible_param(schedule, "mmts", "shift_min", {"alpha": 0.5})


def _draw(param: Any, rng: random.Random) -> float:
    if isinstance(param, RangeParam):
        if param.log:
            return math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
        return rng.uniform(param.low, param.high)
    if isinstance(param, list):
        return rng.choice(param)
    return param


bounds = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.tuples(bounds, bounds),
    shift_min=st.tuples(bounds, bounds),
    shift_max=st.tuples(bounds, bounds),
    tau_min=st.tuples(bounds, bounds),
    tau_max=st.tuples(bounds, bounds),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_sequential_sampling_always_valid(
    alpha: tuple[float, float],
    shift_min: tuple[float, float],
    shift_max: tuple[float, float],
    tau_min: tuple[float, float],
    tau_max: tuple[float, float],
    seed: int,
) -> None:
    def as_range(pair: tuple[float, float]) -> RangeParam:
        low, high = sorted(pair)
        assume(low < high)
        return RangeParam(low=low, high=high)

    try:
        schedule = ScheduleSpace(
            families=["ts_cosine", "mmts"],
            alpha=as_range(alpha),
            shift_min=as_range(shift_min),
            shift_max=as_range(shift_max),
            tau_min=as_range(tau_min),
            tau_max=as_range(tau_max),
        )
    except ValidationError:
        return
    rng = random.Random(seed)

    for family in ("ts_cosine", "mmts"):
        for order in (FAMILY_PARAMETERS[family], tuple(reversed(FAMILY_PARAMETERS[family]))):
            chosen: dict[str, float] = {}
            for name in order:
                value = _draw(feasible_param(schedule, family, name, chosen), rng)
                chosen[name] = round(value) if name == "oscillations" else value

            assert point_violations(family, chosen) == [], (family, chosen)


# --- cluster resources -------------------------------------------------------------------


def _node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict[str, Any]:
    resources = {"CPU": cpu, "memory": 1e9}
    if gpu:
        resources["GPU"] = gpu
    return {"Alive": alive, "Resources": resources}


def test_check_resources_fits() -> None:
    spec = parse_sweep(sweep("resources: {cpu: 4, gpu: 1}\n"))

    check_resources(spec, [_node(2), _node(8, gpu=2)])


def test_check_resources_gpu_too_large() -> None:
    spec = parse_sweep(sweep("resources: {cpu: 1, gpu: 2}\n"))

    with pytest.raises(SweepValidationError) as info:
        check_resources(spec, [_node(8, gpu=1), _node(16, gpu=4, alive=False)])

    assert_problem(info.value.problems, "resources.gpu", "largest of the 1 live nodes has 1")


def test_check_resources_cpu_too_large() -> None:
    spec = parse_sweep(sweep("resources: {cpu: 32}\n"))

    with pytest.raises(SweepValidationError) as info:
        check_resources(spec, [_node(8)])

    assert_problem(info.value.problems, "resources.cpu", "requests 32 CPU")


def test_check_resources_no_live_node() -> None:
    spec = parse_sweep(MINIMAL)

    with pytest.raises(SweepValidationError) as info:
        check_resources(spec, [_node(8, alive=False)])

    assert_problem(info.value.problems, "resources", "no live node")
