"""Search space, samplers and the Optuna study wiring, without Ray trials."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest
from ray.tune.schedulers import FIFOScheduler

from mmts_search.schedules import FAMILY_PARAMETERS, make_schedule
from mmts_search.search.pruning import OptunaPruningScheduler, make_scheduler
from mmts_search.search.searcher import StudySearch, make_sampler, nsga2_population_size
from mmts_search.search.space import (
    GRID_POINT_PARAM,
    MIN_TEMPERATURE_GAP,
    TRIAL_NUMBER_KEY,
    SearchSpace,
    SearchSpaceError,
    check_constraints,
)
from mmts_search.spec import grid_size, load_sweep, parse_sweep, point_violations

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FILES = sorted((PROJECT_ROOT / "search_spaces").glob("*.yaml"))

BASE_SWEEP = """
name: space-test
datasets: [{name: digits, source: 'builtin:digits-lt'}]
training: {epochs: 4}
"""


def sweep(extra: str = "", overrides: tuple[str, ...] = ()) -> object:
    return parse_sweep(BASE_SWEEP + extra, overrides=list(overrides))


def sample_points(space: SearchSpace, sampler: optuna.samplers.BaseSampler, n: int,
                  directions: tuple[str, ...] = ("maximize",)) -> list[dict]:
    """Sample ``n`` points through a real study, telling a made-up value for each."""
    study = optuna.create_study(sampler=sampler, directions=list(directions))
    points = []
    for _ in range(n):
        trial = study.ask()
        config = space(trial)
        points.append(config)
        value = sum(v for k, v in config.items() if isinstance(v, float))
        study.tell(trial, [value] * len(directions))
    return points


def assert_valid_point(config: dict) -> None:
    family = config["family"]
    params = {k: v for k, v in config.items() if k not in ("family", TRIAL_NUMBER_KEY)}
    assert set(params) == set(FAMILY_PARAMETERS[family]), config
    assert check_constraints(family, params) == [], config
    assert point_violations(family, params) == [], config
    make_schedule(family, params, total_steps=100, min_count=1, max_count=50)
    if family == "mmts":
        assert params["shift_min"] - params["alpha"] / 2 >= MIN_TEMPERATURE_GAP - 1e-12
        assert params["shift_max"] >= params["shift_min"]
    if family == "ts_cosine":
        assert params["tau_max"] - params["tau_min"] >= MIN_TEMPERATURE_GAP - 1e-12
    if "oscillations" in params:
        assert isinstance(params["oscillations"], int)


def test_shipped_files_exist() -> None:
    assert SHIPPED_FILES, "search_spaces/*.yaml not found"


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_shipped_file_points_satisfy_constraints(path: Path) -> None:
    spec = load_sweep(path)
    space = SearchSpace.from_spec(spec)

    if space.grid:
        points = space.grid_points()
        assert len(points) == space.grid_size()
        for point in points:
            assert_valid_point({"family": point["family"], **point["params"]})
        return

    for sampler, n in ((optuna.samplers.RandomSampler(seed=1), 400),
                       (make_sampler("tpe", seed=2, num_samples=60, max_concurrent=1), 60)):
        for config in sample_points(space, sampler, n):
            assert_valid_point(config)
            assert config["family"] in spec.schedule.families


def test_tight_mmts_ranges_never_break_constraints() -> None:
    # alpha up to 0.6 needs shift_min > 0.3, at the very top of its range.
    spec = sweep("""
schedule:
  families: [mmts]
  alpha: {low: 0.0, high: 0.6}
  oscillations: {low: 1, high: 3}
  shift_min: {low: 0.01, high: 0.32}
  shift_max: {low: 0.05, high: 0.33}
""")
    space = SearchSpace.from_spec(spec)
    configs = sample_points(space, optuna.samplers.RandomSampler(seed=0), 500)
    for config in configs:
        assert_valid_point(config)
    assert max(c["alpha"] for c in configs) <= 2 * (0.32 - MIN_TEMPERATURE_GAP) + 1e-12


def test_stepped_ranges_stay_on_their_lattice() -> None:
    spec = sweep("""
schedule:
  families: [mmts]
  alpha: {low: 0.0, high: 0.2, step: 0.05}
  oscillations: [1, 2]
  shift_min: {low: 0.05, high: 0.3, step: 0.05}
  shift_max: {low: 0.1, high: 0.5, step: 0.1}
""")
    space = SearchSpace.from_spec(spec)
    for config in sample_points(space, optuna.samplers.RandomSampler(seed=3), 300):
        assert_valid_point(config)
        for name, base, step in (("alpha", 0.0, 0.05), ("shift_min", 0.05, 0.05),
                                 ("shift_max", 0.1, 0.1)):
            k = (config[name] - base) / step
            assert math.isclose(k, round(k), abs_tol=1e-6), (name, config[name])


def test_categorical_alpha_narrows_shift_min_range() -> None:
    spec = sweep("""
schedule:
  families: [mmts]
  alpha: [0.0, 0.3]
  oscillations: 2
  shift_min: {low: 0.02, high: 0.4}
  shift_max: 0.5
""")
    space = SearchSpace.from_spec(spec)
    configs = sample_points(space, optuna.samplers.RandomSampler(seed=4), 200)
    for config in configs:
        assert_valid_point(config)
    assert {c["alpha"] for c in configs} == {0.0, 0.3}


def test_fixed_values_are_constants_not_suggestions() -> None:
    spec = sweep("""
schedule:
  families: [mmts]
  alpha: 0.1
  oscillations: 2
  shift_min: {low: 0.1, high: 0.2}
  shift_max: 0.4
""")
    space = SearchSpace.from_spec(spec)
    study = optuna.create_study()
    trial = study.ask()
    config = space(trial)

    assert config["alpha"] == 0.1
    assert config["oscillations"] == 2
    assert config["shift_max"] == 0.4
    assert set(trial.params) == {"family", "shift_min"}
    assert config[TRIAL_NUMBER_KEY] == trial.number


def test_trial_number_is_returned_as_constant() -> None:
    space = SearchSpace.from_spec(sweep())
    study = optuna.create_study()
    numbers = [space(study.ask())[TRIAL_NUMBER_KEY] for _ in range(3)]
    assert numbers == [0, 1, 2]


def test_infeasible_categorical_combination_is_rejected() -> None:
    with pytest.raises(SearchSpaceError) as caught:
        SearchSpace.from_schedule(
            families=["mmts"],
            values={"alpha": [0.1, 0.8], "oscillations": 1,
                    "shift_min": {"low": 0.02, "high": 0.3}, "shift_max": 0.5},
        )
    paths = [path for path, _, _ in caught.value.problems]
    assert paths == ["schedule.shift_min"]
    assert "alpha" in str(caught.value)


def test_log_range_with_nonpositive_low_is_rejected() -> None:
    with pytest.raises(SearchSpaceError, match="log range needs low > 0"):
        SearchSpace.from_schedule(families=["constant"],
                                  values={"tau": {"low": 0.0, "high": 0.1, "log": True}})


def test_grid_size_and_distinct_points() -> None:
    spec = sweep("""
schedule:
  families: [constant, mmts]
  tau: [0.05, 0.07, 0.1]
  alpha: [0.0, 0.1]
  oscillations: [1, 2]
  shift_min: {low: 0.1, high: 0.2, step: 0.05}
  shift_max: [0.3]
search: {algorithm: grid}
""")
    space = SearchSpace.from_spec(spec)
    # constant: 3 points; mmts: 2 alphas * 2 oscillations * 3 shift_min * 1 shift_max.
    assert space.grid_size() == 3 + 12
    assert space.grid_size() == grid_size(spec.schedule)

    sampler = make_sampler("grid", seed=0, num_samples=15, max_concurrent=2,
                           grid_labels=space.grid_labels())
    study = optuna.create_study(sampler=sampler)
    trials = [study.ask() for _ in range(space.grid_size())]
    configs = [space(trial) for trial in trials]
    for trial in trials:
        study.tell(trial, 1.0)

    keys = {tuple(sorted((k, v) for k, v in c.items() if k != TRIAL_NUMBER_KEY))
            for c in configs}
    assert len(keys) == 15
    for config in configs:
        assert_valid_point(config)
    assert all(set(t.params) == {GRID_POINT_PARAM} for t in study.trials)
    assert study.trials[0].user_attrs["family"] in ("constant", "mmts")


def test_grid_needs_steps_on_ranges() -> None:
    with pytest.raises(SearchSpaceError, match="range with step"):
        SearchSpace.from_schedule(families=["constant"],
                                  values={"tau": {"low": 0.01, "high": 0.1}}, grid=True)


@pytest.mark.parametrize("algorithm,expected", [
    ("tpe", optuna.samplers.TPESampler),
    ("random", optuna.samplers.RandomSampler),
    ("cmaes", optuna.samplers.CmaEsSampler),
    ("nsga2", optuna.samplers.NSGAIISampler),
])
def test_make_sampler_types(algorithm: str, expected: type) -> None:
    sampler = make_sampler(algorithm, seed=0, num_samples=16, max_concurrent=2)
    assert isinstance(sampler, expected)


def test_cmaes_handles_categorical_family() -> None:
    space = SearchSpace.from_spec(sweep())
    sampler = make_sampler("cmaes", seed=0, num_samples=40, max_concurrent=1)
    configs = sample_points(space, sampler, 40)
    for config in configs:
        assert_valid_point(config)
    assert len({c["family"] for c in configs}) > 1


def test_unknown_algorithm_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown search.algorithm"):
        make_sampler("bayes", seed=0, num_samples=4, max_concurrent=1)


def test_nsga2_population_size_bounds() -> None:
    assert nsga2_population_size(4) == 2
    assert nsga2_population_size(40) == 10
    assert nsga2_population_size(1000) == 50


def test_nsga2_multi_objective_wiring() -> None:
    spec = sweep("""
search: {algorithm: nsga2, num_samples: 8}
objective: {metric: [head_rsum, tail_rsum], mode: max}
pruner: {kind: none}
""")
    space = SearchSpace.from_spec(spec)
    searcher = StudySearch(
        space, metric=spec.objective.metric_list(), mode=spec.objective.mode_list(),
        sampler=make_sampler("nsga2", seed=0, num_samples=8, max_concurrent=1),
        study_name=spec.name, storage=None,
    )

    assert searcher.is_multi_objective
    assert searcher.study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    assert isinstance(make_scheduler(spec, searcher), FIFOScheduler)
    assert not isinstance(make_scheduler(spec, searcher), OptunaPruningScheduler)

    values = {"a": (10.0, 1.0), "b": (1.0, 10.0), "c": (0.5, 0.5)}
    for trial_id, (head, tail) in values.items():
        config = searcher.suggest(trial_id)
        assert_valid_point(config)
        assert searcher.report(trial_id, 1.0, 1) is False
        searcher.on_trial_complete(trial_id, {"head_rsum": head, "tail_rsum": tail})

    pareto = {trial.values[0] for trial in searcher.study.best_trials}
    assert pareto == {10.0, 1.0}


def test_space_and_searcher_pickle_for_resume(tmp_path: Path) -> None:
    spec = sweep()
    space = SearchSpace.from_spec(spec)
    restored_space = pickle.loads(pickle.dumps(space))
    assert restored_space.describe() == space.describe()

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = StudySearch(space, metric="objective", mode="max",
                           sampler=make_sampler("tpe", seed=0, num_samples=4, max_concurrent=2),
                           study_name=spec.name, storage=storage,
                           pruner=optuna.pruners.MedianPruner())
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))

    copy = StudySearch(space, metric="objective", mode="max",
                       sampler=make_sampler("tpe", seed=0, num_samples=4, max_concurrent=2),
                       study_name=spec.name, storage=storage)
    copy.restore(str(tmp_path / "searcher.pkl"))
    assert copy.optuna_trial("t1").number == 0
    assert isinstance(copy.study.pruner, optuna.pruners.MedianPruner)


def test_restore_fails_orphaned_running_trials(tmp_path: Path) -> None:
    spec = sweep()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = StudySearch(SearchSpace.from_spec(spec), metric="objective", mode="max",
                           sampler=optuna.samplers.RandomSampler(seed=0),
                           study_name=spec.name, storage=storage)
    searcher.suggest("kept")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("lost")  # asked after the last save: the driver died in between

    searcher.restore(str(tmp_path / "searcher.pkl"))

    states = {t.number: t.state for t in searcher.study.trials}
    assert states == {0: optuna.trial.TrialState.RUNNING, 1: optuna.trial.TrialState.FAIL}


@pytest.mark.parametrize("algorithm", ["tpe", "random", "cmaes", "grid", "nsga2"])
def test_samplers_pickle_for_tune_checkpoints(algorithm: str) -> None:
    sampler = make_sampler(algorithm, seed=0, num_samples=8, max_concurrent=2,
                           grid_labels=["a", "b"])
    restored = pickle.loads(pickle.dumps(sampler))
    assert type(restored) is type(sampler)
