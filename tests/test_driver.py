"""The sweep driver: state files, leaderboard, failures, grid and Pareto runs, and the
real command on the demo sweep (run, and resume after the driver is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from optuna.trial import TrialState
from ray import cloudpickle, tune

from mmts_search.search.driver import SweepError, run_sweep
from mmts_search.spec import load_sweep, parse_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO = PROJECT_ROOT / "search_spaces" / "demo.yaml"
CLI = Path(sys.executable).parent / "mmts-search"

SWEEP = """
name: {name}
datasets: [{{name: digits, source: 'builtin:digits-lt'}}]
training: {{epochs: 3}}
schedule:
  families: [constant, mmts]
  tau: {{low: 0.05, high: 0.2}}
  alpha: {{low: 0.0, high: 0.2}}
  oscillations: {{low: 1, high: 3}}
  shift_min: {{low: 0.11, high: 0.2}}
  shift_max: {{low: 0.2, high: 0.4}}
search: {{algorithm: random, num_samples: 4, max_concurrent: 2, seed: 0, max_failures: 0}}
pruner: {{kind: none}}
storage: {storage}
"""


def fake_trainable(config: dict, *, sweep: dict, run_context: dict | None = None) -> None:
    """Objective grows with the epoch; the constant family scores higher."""
    quality = 2.0 if config["family"] == "constant" else 1.0
    for epoch in range(1, sweep["training"]["epochs"] + 1):
        value = quality * epoch
        tune.report({"epoch": epoch, "objective": value, "rsum": value,
                     "head_rsum": value * 2, "mid_rsum": value, "tail_rsum": value / 2})


def failing_trainable(config: dict, *, sweep: dict, run_context: dict | None = None) -> None:
    """Trial 0 diverges at epoch 2, trial 1 crashes before reporting, others complete."""
    number = config["optuna_trial_number"]
    if number == 1:
        raise RuntimeError("simulated crash")
    for epoch in range(1, sweep["training"]["epochs"] + 1):
        if number == 0 and epoch == 2:
            tune.report({"epoch": epoch, "objective": float("nan"), "diverged": 1,
                         "error": "loss is nan"})
            return
        tune.report({"epoch": epoch, "objective": float(epoch), "rsum": float(epoch)})


def tradeoff_trainable(config: dict, *, sweep: dict, run_context: dict | None = None) -> None:
    """Head and tail recalls trade off through tau: a Pareto front with several trials."""
    tau = config.get("tau", 0.1)
    for epoch in range(1, sweep["training"]["epochs"] + 1):
        head, tail = 100 * tau * epoch, 10 * (0.25 - tau) * epoch
        tune.report({"epoch": epoch, "objective": head, "head_rsum": head,
                     "tail_rsum": tail, "rsum": head + tail})


@pytest.fixture(scope="module")
def local_ray() -> object:
    # Ray workers cannot import this test module, so its trainables travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def load_study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name,
                             storage=f"sqlite:///{folder / name / 'optuna.db'}")


@pytest.mark.slow
def test_run_sweep_writes_state_and_best(local_ray: object, tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="state", storage=tmp_path))
    events = []

    outcome = run_sweep(spec, trainable=fake_trainable, track=False, progress=events.append)

    assert outcome.finished
    assert outcome.experiment_uri == str(tmp_path / "state")
    assert len(outcome.leaderboard) == 4
    assert set(outcome.leaderboard["status"]) == {"COMPLETE"}
    assert list(outcome.leaderboard["objective"]) == sorted(outcome.leaderboard["objective"],
                                                            reverse=True)
    for _, row in outcome.leaderboard.iterrows():
        for name, value in json.loads(row["params"]).items():
            assert row[name] == value

    saved = load_sweep(tmp_path / "state" / "sweep.yaml")
    assert saved == spec

    best = load_sweep(outcome.best_yaml)
    assert best.schedule.families == [outcome.best["family"]]
    assert outcome.best["objective"] == outcome.leaderboard["objective"].max()

    kinds = Counter(event.kind for event in events)
    assert kinds["complete"] == 4
    assert kinds["result"] == 4 * 3
    assert events[-1].ended == 4
    assert events[-1].total == 4
    assert events[-1].best_objective == outcome.best["objective"]

    study = load_study(tmp_path, "state")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert outcome.study_storage == f"sqlite:///{tmp_path / 'state' / 'optuna.db'}"


@pytest.mark.slow
def test_existing_sweep_folder_is_refused(local_ray: object, tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="again", storage=tmp_path),
                       overrides=["search.num_samples=1"])
    run_sweep(spec, trainable=fake_trainable, track=False)

    with pytest.raises(SweepError, match="mmts-search resume"):
        run_sweep(spec, trainable=fake_trainable, track=False)


@pytest.mark.slow
def test_diverged_and_crashed_trials_are_failed(local_ray: object, tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="failing", storage=tmp_path),
                       overrides=["search.max_concurrent=1"])

    outcome = run_sweep(spec, trainable=failing_trainable, track=False)

    board = outcome.leaderboard.set_index("optuna_trial_number")
    assert board.loc[0, "status"] == "FAILED"
    assert board.loc[1, "status"] == "FAILED"
    assert board.loc[1, "trial_id"], "a trial without reports is still named"
    assert board.loc[1, "family"] in ("constant", "mmts")
    assert set(board.loc[[2, 3], "status"]) == {"COMPLETE"}
    states = {t.number: t.state for t in load_study(tmp_path, "failing").trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.FAIL,
                      2: TrialState.COMPLETE, 3: TrialState.COMPLETE}
    assert outcome.best["objective"] == 3.0


@pytest.mark.slow
def test_grid_runs_each_point_once(local_ray: object, tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="grid", storage=tmp_path), overrides=[
        "schedule.families=[constant]", "schedule.tau=[0.05, 0.1, 0.2]",
        "search.algorithm=grid", "search.num_samples=10",
    ])

    outcome = run_sweep(spec, trainable=fake_trainable, track=False)

    assert outcome.num_samples == 3
    taus = sorted(json.loads(p)["tau"] for p in outcome.leaderboard["params"])
    assert taus == [0.05, 0.1, 0.2]


@pytest.mark.slow
def test_nsga2_reports_pareto_front(local_ray: object, tmp_path: Path) -> None:
    spec = parse_sweep(SWEEP.format(name="pareto", storage=tmp_path), overrides=[
        "schedule.families=[constant]", "search.algorithm=nsga2", "search.num_samples=4",
        "objective.metric=[head_rsum, tail_rsum]", "objective.mode=max",
    ])

    outcome = run_sweep(spec, trainable=tradeoff_trainable, track=False)

    assert outcome.metrics == ["head_rsum", "tail_rsum"]
    # Every trial trades head against tail, so none dominates another.
    assert len(outcome.pareto) == 4
    study = load_study(tmp_path, "pareto")
    assert len(study.directions) == 2
    assert len(study.best_trials) == 4


# --------------------------------------------------------------------------------------
# The real command on the demo sweep (worker, MLflow in SQLite, local Ray per process)
# --------------------------------------------------------------------------------------


def demo_overrides(tmp_path: Path, *extra: str) -> list[str]:
    values = [
        f"storage={tmp_path / 'results'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "search.max_concurrent=2", *extra,
    ]
    return [arg for value in values for arg in ("--set", value)]


def cli_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def assert_study_matches_leaderboard(tmp_path: Path, expected_trials: int) -> None:
    study = load_study(tmp_path / "results", "demo")
    states = Counter(t.state for t in study.trials)
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    assert finished == expected_trials, states
    assert states[TrialState.RUNNING] == 0
    for trial in study.trials:
        if trial.state == TrialState.PRUNED:
            assert trial.intermediate_values, "pruned trials keep their curve"


@pytest.mark.slow
def test_cli_run_demo_with_reduced_budget(tmp_path: Path) -> None:
    args = [str(CLI), "run", str(DEMO), *demo_overrides(
        tmp_path, "search.num_samples=2", "training.epochs=2", "pruner.grace_epochs=1")]

    done = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=400)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "best" in done.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in done.stdout
    assert "optuna-dashboard sqlite:///" in done.stdout
    assert_study_matches_leaderboard(tmp_path, 2)

    best = tmp_path / "results" / "demo" / "best.yaml"
    data = yaml.safe_load(best.read_text())
    assert len(data["schedule"]["families"]) == 1
    assert load_sweep(best).training.epochs == 2


@pytest.mark.slow
def test_cli_resume_after_kill_keeps_num_samples(tmp_path: Path) -> None:
    args = [str(CLI), "run", str(DEMO), *demo_overrides(
        tmp_path, "search.num_samples=3", "training.epochs=2", "pruner.kind=none",
        "search.max_concurrent=1")]
    process = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "COMPLETE" in line or time.monotonic() > deadline:
                break
    finally:
        # SIGKILL the driver and the local Ray instance it started (same process group).
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert any("COMPLETE" in line for line in lines), "".join(lines)[-3000:]

    study = load_study(tmp_path / "results", "demo")
    before = Counter(t.state for t in study.trials)
    assert before[TrialState.COMPLETE] >= 1
    assert before[TrialState.COMPLETE] < 3

    resumed = subprocess.run([str(CLI), "resume", str(tmp_path / "results" / "demo")],
                             cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                             timeout=400)

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_study_matches_leaderboard(tmp_path, 3)
    trial_dirs = [p for p in (tmp_path / "results" / "demo").iterdir()
                  if p.is_dir() and p.name.startswith("train_trial")]
    assert len(trial_dirs) == 3
    assert "Top 3 of 3 trials" in resumed.stdout


@pytest.mark.slow
def test_s3_storage_keeps_results_in_bucket(local_ray: object, s3_endpoint: object,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_endpoint.create_bucket("sweeps")
    monkeypatch.setenv("MMTS_STATE_DIR", str(tmp_path / "state"))
    spec = parse_sweep(SWEEP.format(name="on-s3", storage=f"s3://{bucket}/runs"),
                       overrides=["search.num_samples=2"])

    outcome = run_sweep(spec, trainable=fake_trainable, track=False)

    assert outcome.finished
    assert outcome.experiment_uri == f"s3://{bucket}/runs/on-s3"
    assert outcome.state_dir.parent == tmp_path / "state"
    assert outcome.state_dir.name.startswith("on-s3-")
    assert (outcome.state_dir / "optuna.db").is_file()
    keys = {item["Key"] for item in s3_endpoint.client().list_objects_v2(
        Bucket=bucket, Prefix="runs/on-s3/")["Contents"]}
    for name in ("sweep.yaml", "best.yaml", "optuna.db", "tuner.pkl"):
        assert f"runs/on-s3/{name}" in keys
    assert any(key.endswith("result.json") for key in keys)


def test_s3_sweeps_of_one_name_keep_separate_state(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mmts_search.search.storage import locate_sweep

    monkeypatch.setenv("MMTS_STATE_DIR", str(tmp_path))
    first = locate_sweep("s3://bucket-a/runs", "demo")
    second = locate_sweep("s3://bucket-b/runs", "demo")

    assert first.state_dir != second.state_dir
    assert locate_sweep("s3://bucket-a/runs/", "demo").state_dir == first.state_dir


def test_stale_state_is_renamed_not_reused(tmp_path: Path) -> None:
    from mmts_search.search.driver import _set_aside_stale_state
    from mmts_search.search.storage import locate_sweep

    location = locate_sweep(str(tmp_path), "demo")
    location.state_dir.mkdir(parents=True)
    (location.state_dir / "optuna.db").write_bytes(b"old study")

    _set_aside_stale_state(location)

    assert not (location.state_dir / "optuna.db").exists()
    stale = list(location.state_dir.glob("optuna.db.stale-*"))
    assert len(stale) == 1
    assert stale[0].read_bytes() == b"old study"
