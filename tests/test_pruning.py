"""Optuna pruners inside Tune: the scheduler, the study states, and real Tune runs.

The Tune runs use a controlled trainable whose objective is ``quality * epoch``, with a
quality that depends only on the Optuna trial number, so that which trials are pruned
does not depend on timing or on training noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray
from optuna.trial import TrialState
from ray import cloudpickle, tune
from ray.tune.schedulers import TrialScheduler

from mmts_search.search.driver import run_sweep
from mmts_search.search.pruning import (
    AshaPruningScheduler,
    OptunaPruningScheduler,
    default_startup_trials,
    make_pruner,
    make_scheduler,
)
from mmts_search.search.searcher import StudySearch
from mmts_search.search.space import SearchSpace
from mmts_search.spec import PrunerSpec, parse_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)

GOOD, BAD = 1.0, 0.1

SWEEP = """
name: {name}
datasets: [{{name: digits, source: 'builtin:digits-lt'}}]
training: {{epochs: 4}}
schedule: {{families: [constant], tau: {{low: 0.05, high: 0.2}}}}
search: {{algorithm: random, num_samples: 6, max_concurrent: 1, seed: 0, max_failures: 0}}
storage: {storage}
"""


def quality_of(config: dict) -> float:
    """Good for even Optuna trial numbers, bad for odd ones."""
    return GOOD if config["optuna_trial_number"] % 2 == 0 else BAD


def controlled_trainable(config: dict, *, sweep: dict, run_context: dict | None = None) -> None:
    quality = quality_of(config)
    for epoch in range(1, sweep["training"]["epochs"] + 1):
        value = quality * epoch
        tune.report({"epoch": epoch, "objective": value, "rsum": value, "head_rsum": value,
                     "mid_rsum": value, "tail_rsum": value})


@pytest.fixture(scope="module")
def local_ray() -> object:
    # Ray workers cannot import this test module, so its trainable travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_searcher(pruner: optuna.pruners.BasePruner, *, mode: str = "max") -> StudySearch:
    space = SearchSpace.from_schedule(families=["constant"],
                                      values={"tau": {"low": 0.05, "high": 0.2}})
    return StudySearch(space, metric="objective", mode=mode,
                       sampler=optuna.samplers.RandomSampler(seed=0),
                       study_name="unit", storage=None, pruner=pruner)


def feed(scheduler: object, trial_id: str, values: list[float], **extra: object) -> list[str]:
    """Send one result per epoch to the scheduler; return its decisions."""
    trial = SimpleNamespace(trial_id=trial_id)
    decisions = []
    for epoch, value in enumerate(values, start=1):
        decision = scheduler.on_trial_result(None, trial, {"epoch": epoch, "objective": value,
                                                           **extra})
        decisions.append(decision)
        if decision == TrialScheduler.STOP:
            break
    return decisions


def test_median_scheduler_stops_clearly_worse_trial() -> None:
    searcher = make_searcher(optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1))
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=4)

    searcher.suggest("good")
    assert feed(scheduler, "good", [10, 20, 30, 40]) == [TrialScheduler.CONTINUE] * 4
    searcher.on_trial_complete("good", {"objective": 40.0, "epoch": 4})

    searcher.suggest("bad")
    assert feed(scheduler, "bad", [1, 2, 3, 4]) == [TrialScheduler.STOP]
    assert searcher.pruned_epoch("bad") == 1
    assert searcher.pruned_epoch("good") is None
    searcher.on_trial_complete("bad", {"objective": 1.0, "epoch": 1})

    bad = searcher.study.trials[searcher.optuna_trial("bad").number]
    assert bad.state == TrialState.PRUNED
    assert bad.intermediate_values == {1: 1.0}
    good = searcher.study.trials[searcher.optuna_trial("good").number]
    assert good.state == TrialState.COMPLETE
    assert good.intermediate_values == {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}


def test_grace_epochs_delay_pruning() -> None:
    searcher = make_searcher(optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=3))
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=5)
    searcher.suggest("good")
    feed(scheduler, "good", [10, 20, 30, 40, 50])
    searcher.on_trial_complete("good", {"objective": 50.0})

    searcher.suggest("bad")
    decisions = feed(scheduler, "bad", [1, 2, 3, 4, 5])
    assert decisions == [TrialScheduler.CONTINUE] * 2 + [TrialScheduler.STOP]
    assert searcher.pruned_epoch("bad") == 3


def test_last_epoch_is_never_pruned() -> None:
    searcher = make_searcher(optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=5))
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=2)
    searcher.suggest("good")
    feed(scheduler, "good", [10, 20])
    searcher.on_trial_complete("good", {"objective": 20.0})

    searcher.suggest("bad")
    assert feed(scheduler, "bad", [1, 2]) == [TrialScheduler.CONTINUE] * 2


def test_minimized_objective_prunes_high_values() -> None:
    searcher = make_searcher(optuna.pruners.MedianPruner(n_startup_trials=1), mode="min")
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=3)
    searcher.suggest("low")
    feed(scheduler, "low", [1, 1, 1])
    searcher.on_trial_complete("low", {"objective": 1.0})

    searcher.suggest("high")
    assert feed(scheduler, "high", [9, 9, 9]) == [TrialScheduler.STOP]


def test_wilcoxon_reports_one_step_per_dataset() -> None:
    searcher = make_searcher(optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=4))
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=3,
                                       dataset_keys=("a/rsum", "b/rsum"))
    searcher.suggest("t")
    trial = SimpleNamespace(trial_id="t")
    for epoch in (1, 2):
        scheduler.on_trial_result(None, trial, {"epoch": epoch, "objective": 5.0,
                                                "a/rsum": 10.0 * epoch, "b/rsum": epoch})
    steps = searcher.study.trials[0].intermediate_values
    # step = epoch * n_datasets + dataset_index
    assert steps == {2: 10.0, 3: 1.0, 4: 20.0, 5: 2.0}


def test_wilcoxon_prunes_trial_worse_on_every_dataset() -> None:
    searcher = make_searcher(optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2))
    keys = tuple(f"d{i}/rsum" for i in range(4))
    scheduler = OptunaPruningScheduler(searcher, metric_key="objective", max_epochs=6,
                                       dataset_keys=keys)

    def results(offset: float) -> list[dict]:
        return [{"epoch": e, "objective": 50.0 + offset,
                 **{k: 50.0 + offset + i + e for i, k in enumerate(keys)}} for e in range(1, 7)]

    searcher.suggest("best")
    for result in results(0.0):
        scheduler.on_trial_result(None, SimpleNamespace(trial_id="best"), result)
    searcher.on_trial_complete("best", {"objective": 50.0})

    searcher.suggest("worse")
    decisions = [scheduler.on_trial_result(None, SimpleNamespace(trial_id="worse"), r)
                 for r in results(-20.0)[:3]]
    assert TrialScheduler.STOP in decisions
    assert searcher.pruned_epoch("worse") is not None


def test_diverged_and_failed_trials_are_told_fail() -> None:
    searcher = make_searcher(optuna.pruners.NopPruner())
    for trial_id in ("diverged", "errored", "no-objective"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("diverged", {"epoch": 2, "objective": 3.0, "diverged": 1,
                                            "error": "loss is nan"})
    searcher.on_trial_complete("errored", None, error=True)
    searcher.on_trial_complete("no-objective", {"epoch": 1})

    assert [t.state for t in searcher.study.trials] == [TrialState.FAIL] * 3


def test_nonfinite_values_are_not_reported() -> None:
    searcher = make_searcher(optuna.pruners.MedianPruner())
    searcher.suggest("t")
    assert searcher.report("t", float("nan"), 1) is False
    assert searcher.report("t", 2.0, 1) is True
    assert searcher.report("t", 3.0, 1) is False  # repeated step after a restore
    assert searcher.study.trials[0].intermediate_values == {1: 2.0}


@pytest.mark.parametrize("kind,expected", [
    ("median", optuna.pruners.MedianPruner),
    ("percentile", optuna.pruners.PercentilePruner),
    ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
    ("hyperband", optuna.pruners.HyperbandPruner),
    ("wilcoxon", optuna.pruners.WilcoxonPruner),
    ("patient", optuna.pruners.PatientPruner),
    ("asha", type(None)),
    ("none", type(None)),
])
def test_make_pruner_kinds(kind: str, expected: type) -> None:
    pruner = make_pruner(PrunerSpec(kind=kind), epochs=8, n_datasets=2, num_samples=16)
    assert isinstance(pruner, expected)


def test_default_startup_trials_bounds() -> None:
    assert default_startup_trials(1) == 1
    assert default_startup_trials(8) == 2
    assert default_startup_trials(100) == 5


def test_asha_scheduler_is_built_with_epoch_time_attr(tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="asha-unit", storage=tmp_path),
                       overrides=["pruner.kind=asha", "pruner.grace_epochs=2"])
    searcher = make_searcher(optuna.pruners.NopPruner())
    scheduler = make_scheduler(spec, searcher)
    assert isinstance(scheduler, AshaPruningScheduler)
    assert scheduler._time_attr == "epoch"
    assert scheduler._max_t == 4


def study_states(path: Path, name: str) -> dict[int, optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{path / name / 'optuna.db'}")
    return {trial.number: trial for trial in study.trials}


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_tune_run_prunes_bad_trials(local_ray: object, tmp_path: Path, pruner: str) -> None:
    name = f"prune-{pruner}"
    overrides = [f"pruner.kind={pruner}", "pruner.grace_epochs=1", "pruner.reduction_factor=2"]
    spec = parse_sweep(SWEEP.format(name=name, storage=tmp_path), overrides=overrides)

    outcome = run_sweep(spec, trainable=controlled_trainable, track=False)

    assert outcome.finished
    board = outcome.leaderboard
    assert len(board) == 6
    trials = study_states(tmp_path, name)
    assert len(trials) == 6
    for _, row in board.iterrows():
        trial = trials[int(row["optuna_trial_number"])]
        if row["optuna_trial_number"] % 2 == 0:
            assert row["status"] == "COMPLETE"
            assert trial.state == TrialState.COMPLETE
            assert row["epochs"] == 4
        else:
            assert row["status"] == "PRUNED", row.to_dict()
            assert trial.state == TrialState.PRUNED
            assert row["epochs"] < 4
            assert row["pruned_epoch"] == row["epochs"]
            assert trial.intermediate_values, "a pruned trial keeps its curve"
            assert max(trial.intermediate_values) == row["epochs"]

    assert outcome.best["objective"] == pytest.approx(GOOD * 4)
    assert json.loads(board.iloc[0]["params"]).keys() == {"tau"}
