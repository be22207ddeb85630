"""Tests of MLflow tracking against a real MLflow server with S3 artifacts (moto).

Server-backed tests use the session fixtures of conftest.py; the outage test starts and
stops its own MLflow server so that the shared one stays up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import BIN_DIR, FAKE_AWS_ENV, free_port, wait_for_http
from mlflow import MlflowClient
from mlflow.entities import ViewType

from mmts_search.spec import dump_sweep, parse_sweep, trial_spec
from mmts_search.tracking import (
    SweepRun,
    TrackingUnavailableError,
    best_per_family,
    flatten_params,
    import_unsent_metrics,
    leaderboard_from_mlflow,
    open_trial_run,
    plot_schedule,
    preflight,
    redact,
    render_report,
    resolve_tracking_uri,
    write_optuna_plots,
)
from mmts_search.tracking._secrets import sanitize_key

optuna.logging.set_verbosity(optuna.logging.WARNING)

PARAMS = {"family": "mmts", "alpha": 0.1, "oscillations": 2, "shift_min": 0.08,
          "shift_max": 0.3, "optuna_trial_number": 3}


def sweep_text(name: str, uri: str, experiment: str, *, datasets: int = 3) -> str:
    """Return a sweep file with several datasets, so that it flattens to >100 params."""
    lines = [f"name: {name}", "datasets:"]
    lines += [f"  - {{name: digits-{i}, source: 'builtin:digits-lt', imbalance_ratio: 10}}"
              for i in range(datasets)]
    lines += [
        "schedule:",
        "  families: [constant, ts_cosine, mmts]",
        "objective: {metric: rsum, mode: max}",
        f"tracking: {{uri: '{uri}', experiment: {experiment}}}",
    ]
    return "\n".join(lines) + "\n"


def open_sweep(tmp_path: Path, uri: str, *, name: str | None = None,
               experiment: str | None = None, **kwargs) -> SweepRun:
    name = name or f"sweep-{uuid.uuid4().hex[:6]}"
    text = sweep_text(name, uri, experiment or f"exp-{uuid.uuid4().hex[:8]}")
    spec = parse_sweep(text)
    return SweepRun.open(spec, sweep_dir=tmp_path / name, sweep_file_text=text,
                         resume=kwargs.pop("resume", False), **kwargs)


# Body of one worker process: a trial that logs metrics, a schedule plot and ends. It
# imports only the tracking package, so that the processes start fast.
CHILD_SCRIPT = """
import json, sys
import numpy as np
from mmts_search.tracking import open_trial_run, plot_schedule

context, trial_id, local_dir, epochs, params = json.loads(sys.argv[1])
run = open_trial_run(context, trial_id=trial_id, params=params, local_dir=local_dir)
for epoch in range(epochs):
    run.log_metrics({"epoch": epoch, "loss": 1.0 / (epoch + 1), "rsum": 10.0 * epoch,
                     "digits-0/rsum": 5.0 * epoch}, step=epoch)
steps = np.arange(50)
curves = {name: 0.1 + 0.05 * np.cos(steps / (5 + i))
          for i, name in enumerate(("head", "mid", "tail"))}
run.log_figure(plot_schedule(steps, curves, ylabel="temperature"), "schedule.png")
run.log_dict({"rsum": 10.0 * (epochs - 1)}, "final_metrics.json")
run.finish("FINISHED")
print(json.dumps({"run_id": run.run_id}))
"""


def run_children(context: dict, jobs: list[tuple[str, int]], folder: Path) -> list[str]:
    """Run one worker process per (trial id, epochs) job at once; return their run ids."""
    processes = []
    for index, (trial_id, epochs) in enumerate(jobs):
        arguments = json.dumps([context, trial_id, str(folder / f"w{index}"), epochs, PARAMS])
        with open(folder / f"w{index}.log", "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-c", CHILD_SCRIPT, arguments],
                stdout=subprocess.PIPE, stderr=log, text=True,
            ))
    run_ids = []
    for index, process in enumerate(processes):
        stdout, _ = process.communicate(timeout=300)
        log_text = (folder / f"w{index}.log").read_text(errors="replace")
        assert process.returncode == 0, log_text[-3000:]
        run_ids.append(json.loads(stdout.strip().splitlines()[-1])["run_id"])
    return run_ids


def all_runs(client: MlflowClient, experiment_id: str):
    return client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000)


# --------------------------------------------------------------------------- no server


@pytest.mark.parametrize(("text", "secret"), [
    ("postgresql://user:hunter22@db:5432/mlflow", "hunter22"),
    ("https://ghp_TOKEN123456@example.com/x", "ghp_TOKEN123456"),
    ("http://127.0.0.1:5000/?token=abcdef123&x=1", "abcdef123"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
    ("key AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
    ('{"password": "s3cr3t-pw"}', "s3cr3t-pw"),
])
def test_redact_masks_secret(text, secret):
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_redact_keeps_ordinary_text():
    commit = "3f786850e387550fdab836ed7e6dc881de23001b"
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    text = f"commit {commit} sha256 {digest} s3://bucket/prefix tau_max: 0.3 max_tokens=5"
    assert redact(text) == text
    assert redact("postgresql://user:pw@db/x").startswith("postgresql://user:***@db")


def test_redact_masks_secret_env_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "FAKESECRETxyz123")
    assert redact("value FAKESECRETxyz123 here") == "value *** here"


def test_flatten_params_masks_secret_fields():
    flat = flatten_params({
        "tracking": {"uri": "http://bob:pw12345678@host:5000", "password": "x"},
        "datasets": [{"name": "a"}, {"name": "b"}],
        "families": ["mmts", "constant"],
        "long": "x" * 900,
    })
    assert flat["tracking.uri"] == "http://bob:***@host:5000"
    assert flat["tracking.password"] == "***"
    assert flat["datasets.1.name"] == "b"
    assert flat["families"] == '["mmts","constant"]'
    assert len(flat["long"]) == 500


def test_sanitize_key_keeps_slashes():
    assert sanitize_key("digits/rsum") == "digits/rsum"
    assert sanitize_key("a$b") == "a_b"
    assert len(sanitize_key("k" * 400)) == 250


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///mlflow.db", "sqlite:////base/mlflow.db"),
    ("sqlite:///sub/m.db?timeout=5", "sqlite:////base/sub/m.db?timeout=5"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("", "sqlite:////base/mlflow.db"),
    ("mlruns", "file:///base/mlruns"),
    ("http://host:5000", "http://host:5000"),
    ("postgresql://u:p@h/db", "postgresql://u:p@h/db"),
])
def test_resolve_tracking_uri(uri, expected):
    assert resolve_tracking_uri(uri, "/base") == expected


def test_plot_schedule_draws_one_line_per_curve():
    steps = np.arange(10)
    figure = plot_schedule(steps, {"head": steps * 0.1, "tail": steps * 0.05},
                           ylabel="temperature")
    assert len(figure.axes[0].lines) == 2
    assert figure.axes[0].get_ylabel() == "temperature"
    with pytest.raises(ValueError, match="tail"):
        plot_schedule(steps, {"tail": np.zeros(3)}, ylabel="t")


def leaderboard_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"trial_id": "t1", "family": "mmts", "alpha": 0.1, "objective": 90.0,
         "status": "COMPLETE", "epochs": 3, "head_rsum": 100, "mid_rsum": 80, "tail_rsum": 60,
         "rsum": 90.0},
        {"trial_id": "t2", "family": "mmts", "alpha": 0.2, "objective": 95.0,
         "status": "PRUNED", "epochs": 1, "head_rsum": 101, "mid_rsum": 81, "tail_rsum": 61,
         "rsum": 95.0},
        {"trial_id": "t3", "family": "constant", "tau": 0.07, "objective": 70.0,
         "status": "COMPLETE", "epochs": 3, "head_rsum": 110, "mid_rsum": 70, "tail_rsum": 30,
         "rsum": 70.0},
        {"trial_id": "t4", "family": "ts_cosine", "objective": None, "status": "FAILED"},
    ])


def test_best_per_family_prefers_complete_trials():
    best = best_per_family(leaderboard_frame())
    assert list(best["trial_id"]) == ["t1", "t3"]
    assert list(best_per_family(leaderboard_frame(), mode="min")["trial_id"]) == ["t3", "t1"]


def test_best_per_family_tolerates_missing_columns():
    best = best_per_family(pd.DataFrame([{"trial_id": "a", "family": "mmts",
                                          "objective": 1.0}]))
    assert list(best["trial_id"]) == ["a"]


def test_render_report_formats():
    table = leaderboard_frame()
    assert "t3" in render_report(table, "table")
    assert render_report(table, "csv").splitlines()[0].startswith("trial_id,family")
    records = json.loads(render_report(table, "json"))
    assert records[0]["trial_id"] == "t1"
    assert render_report(table.iloc[0:0], "table") == "no trials found"
    with pytest.raises(ValueError, match="xml"):
        render_report(table, "xml")


def make_study(*, complete: int, pruned: int, directions=("maximize",)) -> optuna.Study:
    study = optuna.create_study(directions=list(directions),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for index in range(complete + pruned):
        trial = study.ask()
        family = trial.suggest_categorical("family", ["mmts", "constant"])
        x = trial.suggest_float("x", 0.0, 1.0)
        if len(directions) > 1:
            study.tell(trial, [x, 1 - x])
            continue
        for epoch in range(3):
            trial.report(x * (epoch + 1) + (family == "mmts"), epoch)
        if index < complete:
            study.tell(trial, x * 3)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study


def test_optuna_plots_of_degenerate_studies(tmp_path):
    written, skipped = write_optuna_plots(make_study(complete=1, pruned=0), tmp_path / "one")
    names = {path.name for path in written}
    assert "optuna_optimization_history.png" in names
    assert "optuna_optimization_history.html" in names
    assert any("param_importances" in reason for reason in skipped)

    written, skipped = write_optuna_plots(make_study(complete=0, pruned=2), tmp_path / "pruned")
    assert {path.name for path in written} == {"optuna_intermediate_values.html",
                                               "optuna_intermediate_values.png"}
    assert any("optimization_history" in reason for reason in skipped)

    written, _ = write_optuna_plots(make_study(complete=4, pruned=0,
                                               directions=("maximize", "minimize")),
                                    tmp_path / "multi")
    names = {path.name for path in written}
    assert "optuna_pareto_front.html" in names
    assert "optuna_pareto_front.png" in names
    assert not any("optimization_history" in name for name in names)


def test_local_only_trial_run_keeps_artifacts(tmp_path):
    with open_trial_run(None, trial_id="local", params=PARAMS, local_dir=tmp_path) as run:
        run.log_metrics({"rsum": 1.0}, step=0)
        run.log_dict({"a": 1}, "final_metrics.json")
        run.log_state_dict({"w": torch.ones(2, 2)})
    assert run.run_id is None
    assert (tmp_path / "artifacts" / "final_metrics.json").is_file()
    assert (tmp_path / "artifacts" / "model" / "model.safetensors").is_file()


def test_import_rejects_masked_uri(tmp_path):
    path = tmp_path / "unsent_metrics.jsonl"
    record = {"kind": "trial", "experiment_id": "1", "parent_run_id": "p", "trial_id": "t",
              "run_id": None, "tracking_uri": "http://alice:***@127.0.0.1:1"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="pass the URI"):
        import_unsent_metrics(path)
    assert path.exists()


# --------------------------------------------------------------------------- shared server


@pytest.mark.slow
def test_parent_run_logs_sweep(mlflow_server, tmp_path):
    sweep = open_sweep(tmp_path, mlflow_server.uri, name="parent-sweep",
                       dataset_fingerprints={"/data/train.npz": "ab" * 32})
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(sweep.run_id)

    assert len(run.data.params) > 100
    assert run.data.params["datasets.2.name"] == "digits-2"
    assert run.data.tags["mmts.sweep"] == "parent-sweep"
    assert run.data.tags["mmts.role"] == "parent"
    for package in ("torch", "ray", "optuna", "mlflow"):
        assert run.data.tags[f"mmts.version.{package}"] != "not installed"
    assert run.data.tags["mmts.dataset_sha256./data/train.npz"] == "ab" * 32
    artifacts = {item.path for item in client.list_artifacts(sweep.run_id, "sweep")}
    assert {"sweep/sweep.yaml", "sweep/search_space.json", "sweep/resolved_sweep.yaml",
            "sweep/datasets.json"} <= artifacts
    space = json.loads(Path(client.download_artifacts(
        sweep.run_id, "sweep/search_space.json", str(tmp_path))).read_text())
    assert space["parameters"]["mmts"]["alpha"] == {"low": 0.0, "high": 0.2, "log": False,
                                                     "step": None}

    resumed = open_sweep(tmp_path, mlflow_server.uri, name="parent-sweep",
                         experiment=client.get_experiment(sweep.experiment_id).name,
                         resume=True)
    assert resumed.run_id == sweep.run_id
    assert client.get_run(sweep.run_id).info.status == "RUNNING"
    sweep.close()
    assert client.get_run(sweep.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_children_from_concurrent_processes(mlflow_server, tmp_path):
    sweep = open_sweep(tmp_path, mlflow_server.uri)
    context = sweep.run_context
    jobs = [("t0", 3), ("t1", 3), ("shared", 2), ("shared", 2)]
    results = run_children(context, jobs, tmp_path)

    client = MlflowClient(mlflow_server.uri)
    children = client.search_runs([sweep.experiment_id],
                                  f"tags.mlflow.parentRunId = '{sweep.run_id}'")
    by_trial = {run.data.tags["mmts.trial_id"]: run for run in children}
    assert len(children) == 3
    assert set(by_trial) == {"t0", "t1", "shared"}
    assert results[2] == results[3] == by_trial["shared"].info.run_id

    objects = mlflow_server.s3.client().list_objects_v2(
        Bucket=mlflow_server.artifact_bucket, MaxKeys=1000)
    keys = [item["Key"] for item in objects.get("Contents", [])]
    for trial_id in ("t0", "t1"):
        run = by_trial[trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["trial_id"] == trial_id
        assert run.data.params["family"] == "mmts"
        assert run.data.params["optuna_trial_number"] == "3"
        history = client.get_metric_history(run.info.run_id, "rsum")
        assert [point.step for point in history] == [0, 1, 2]
        assert len(client.get_metric_history(run.info.run_id, "digits-0/rsum")) == 3
        assert any(key.endswith(f"{run.info.run_id}/artifacts/schedule.png") for key in keys)


@pytest.mark.slow
def test_retried_trial_reuses_child_run(mlflow_server, tmp_path):
    sweep = open_sweep(tmp_path, mlflow_server.uri)
    first = open_trial_run(sweep.run_context, trial_id="retry", params=PARAMS,
                           local_dir=tmp_path / "a1")
    first.log_metrics({"rsum": 1.0}, step=0)

    changed = {**PARAMS, "alpha": 0.15}
    second = open_trial_run(sweep.run_context, trial_id="retry", params=changed,
                            local_dir=tmp_path / "a2")
    second.log_metrics({"rsum": 2.0, "error": "diverged: loss is nan"}, step=1)
    second.finish("FAILED")

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(first.run_id)
    assert second.run_id == first.run_id
    assert run.data.params["alpha"] == "0.1"
    assert run.data.tags["mmts.param_conflict.alpha"] == "0.15"
    assert run.data.tags["mmts.attempts"] == "2"
    assert run.data.tags["error"] == "diverged: loss is nan"
    assert "error" not in run.data.metrics
    assert run.info.status == "FAILED"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "rsum")] == [0, 1]


@pytest.mark.slow
def test_tune_callback_sets_trial_states(mlflow_server, tmp_path):
    sweep = open_sweep(tmp_path, mlflow_server.uri)
    runs = {trial_id: open_trial_run(sweep.run_context, trial_id=trial_id, params=PARAMS,
                                     local_dir=tmp_path / trial_id)
            for trial_id in ("pruned", "failed", "complete", "dangling")}
    callback = sweep.tune_callback(lambda trial_id: 2 if trial_id == "pruned" else None)

    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="pruned"))
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="failed",
                                                   error_msg="RuntimeError: boom"))
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="complete"))
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="never-opened"))
    # The stopped worker ending its run afterwards must not undo the pruning.
    runs["pruned"].finish("FINISHED")
    closed = sweep.close_dangling_children()

    client = MlflowClient(mlflow_server.uri)
    pruned = client.get_run(runs["pruned"].run_id)
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["pruned_epoch"] == "2"
    failed = client.get_run(runs["failed"].run_id)
    assert failed.info.status == "FAILED"
    assert "boom" in failed.data.tags["error"]
    assert client.get_run(runs["complete"].run_id).info.status == "FINISHED"
    assert closed == [runs["dangling"].run_id]
    dangling = client.get_run(runs["dangling"].run_id)
    assert dangling.info.status == "KILLED"
    assert dangling.data.tags["mmts.interrupted"] == "true"
    assert callback.__getstate__()["_sweep"] is None


@pytest.mark.slow
def test_finalize_logs_results_on_parent(mlflow_server, tmp_path):
    sweep = open_sweep(tmp_path, mlflow_server.uri)
    best = open_trial_run(sweep.run_context, trial_id="t1", params=PARAMS,
                          local_dir=tmp_path / "t1")
    best.log_state_dict({"weight": torch.ones(3, 2)}, metadata={"family": "mmts"})
    best.finish("FINISHED")
    spec = parse_sweep(sweep_text("fin", mlflow_server.uri, "unused"))
    best_yaml = dump_sweep(trial_spec(spec, "mmts", PARAMS))

    results = sweep.finalize(leaderboard_frame(), make_study(complete=4, pruned=1), best_yaml)
    version = sweep.register_best_model("mmts-best-test", trial_id="t1")

    client = MlflowClient(mlflow_server.uri)
    top = {item.path for item in client.list_artifacts(sweep.run_id)}
    plots = {item.path for item in client.list_artifacts(sweep.run_id, "plots")}
    assert {"leaderboard.csv", "best_config.yaml", "best_per_family.csv"} <= top
    for name in ("optimization_history", "param_importances", "parallel_coordinate",
                 "intermediate_values"):
        assert f"plots/optuna_{name}.html" in plots
        assert f"plots/optuna_{name}.png" in plots
    assert "plots/head_mid_tail_rsum.png" in plots
    assert results["plots/head_mid_tail_rsum.png"] == "logged"
    leaderboard = pd.read_csv(client.download_artifacts(sweep.run_id, "leaderboard.csv",
                                                        str(tmp_path)))
    assert list(leaderboard["trial_id"]) == ["t2", "t1", "t3", "t4"]
    parent = client.get_run(sweep.run_id)
    assert parent.data.tags["mmts.best_trial_id"] == "t1"
    assert parent.data.metrics["best_objective"] == 90.0
    assert version == "1"
    model_version = client.get_model_version("mmts-best-test", "1")
    assert model_version.run_id == best.run_id


@pytest.mark.slow
def test_leaderboard_from_mlflow(mlflow_server, tmp_path):
    experiment = f"report-{uuid.uuid4().hex[:6]}"
    sweep = open_sweep(tmp_path, mlflow_server.uri, name="report-sweep", experiment=experiment)
    values = {"a": 50.0, "b": 80.0, "c": 65.0}
    for trial_id, objective in values.items():
        run = open_trial_run(sweep.run_context, trial_id=trial_id, params=PARAMS,
                             local_dir=tmp_path / trial_id)
        for epoch in range(2):
            run.log_metrics({"epoch": epoch, "objective": objective, "head_rsum": 90.0,
                             "mid_rsum": 60.0, "tail_rsum": 30.0, "rsum": objective}, epoch)
        run.finish("FINISHED")
    sweep.end_trial("c", pruned_epoch=1)

    table = leaderboard_from_mlflow(mlflow_server.uri, experiment=experiment,
                                    sweep="report-sweep", top=2)
    assert list(table["trial_id"]) == ["b", "c"]
    assert list(table["status"]) == ["COMPLETE", "PRUNED"]
    assert table.iloc[0]["alpha"] == 0.1
    assert table.iloc[0]["epochs"] == 1
    assert table.iloc[0]["tail_rsum"] == 30.0
    assert list(best_per_family(table)["trial_id"]) == ["b"]
    assert "report-sweep" in render_report(table, "table")
    with pytest.raises(ValueError, match="no-such-experiment"):
        leaderboard_from_mlflow(mlflow_server.uri, experiment="no-such-experiment")


@pytest.mark.slow
def test_secrets_leave_no_trace(mlflow_server, tmp_path, monkeypatch, caplog):
    secrets = ("FAKESECRETxyz123", "FAKETOKENabc98765", "FAKEPASSWORDqq77")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[0])
    monkeypatch.setenv("AWS_SESSION_TOKEN", secrets[1])
    host = mlflow_server.uri.split("://", 1)[1]
    uri = f"http://alice:{secrets[2]}@{host}"
    caplog.set_level("DEBUG", logger="mmts_search")

    sweep = open_sweep(tmp_path, uri, name="secret-sweep")
    run = open_trial_run(sweep.run_context, trial_id="s1",
                         params={**PARAMS, "note": f"key={secrets[0]}"},
                         local_dir=tmp_path / "s1")
    run.log_metrics({"rsum": 1.0, "error": f"failed at {uri} with {secrets[1]}"}, step=0)
    run.log_dict({"uri": uri, "env": os.environ["AWS_SECRET_ACCESS_KEY"]}, "final.json")
    run.finish("FAILED", {"error": f"token {secrets[1]}"})
    sweep.finalize(leaderboard_frame(), None, f"tracking: {{uri: '{uri}'}}\n")
    sweep.close()

    client = MlflowClient(mlflow_server.uri)
    stored = []
    for stored_run in all_runs(client, sweep.experiment_id):
        stored += list(stored_run.data.params.values()) + list(stored_run.data.tags.values())
        folder = tmp_path / "download" / stored_run.info.run_id
        folder.mkdir(parents=True)
        client.download_artifacts(stored_run.info.run_id, "", str(folder))
        stored += [path.read_bytes().decode("utf-8", "replace")
                   for path in folder.rglob("*") if path.is_file()]
    stored.append((tmp_path / "secret-sweep" / "mlflow_parent.json").read_text())
    stored += [record.getMessage() for record in caplog.records]
    assert len(stored) > 100
    for secret in secrets:
        assert not [text for text in stored if secret in text], secret


@pytest.mark.slow
def test_preflight_unreachable_server_fails_fast():
    uri = f"http://admin:FAKEPASSWORDqq77@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as raised:
        preflight(uri)
    assert time.monotonic() - started < 10
    assert "127.0.0.1" in str(raised.value)
    assert "FAKEPASSWORDqq77" not in str(raised.value)


@pytest.mark.slow
def test_preflight_reports_missing_bucket(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    name = f"nobucket-{uuid.uuid4().hex[:6]}"
    client.create_experiment(name, artifact_location="s3://missing-bucket-mmts/artifacts")
    preflight(mlflow_server.uri)
    with pytest.raises(TrackingUnavailableError, match="missing-bucket-mmts"):
        preflight(mlflow_server.uri, experiment=name)


def test_preflight_missing_sqlite_folder(tmp_path):
    with pytest.raises(TrackingUnavailableError, match="does not exist"):
        preflight(f"sqlite:///{tmp_path}/absent/mlflow.db")


def test_sqlite_store_next_to_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    sweep = open_sweep(tmp_path, "sqlite:///mlflow.db", name="local-sweep",
                       experiment="local", base_dir=tmp_path)
    assert sweep.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path / "work")
    run = open_trial_run(sweep.run_context, trial_id="l1", params=PARAMS,
                         local_dir=tmp_path / "l1")
    run.log_metrics({"objective": 3.0}, step=0)
    run.log_state_dict({"w": torch.zeros(2)})
    run.finish()

    client = MlflowClient(sweep.tracking_uri)
    location = client.get_experiment(sweep.experiment_id).artifact_location
    assert location == f"{tmp_path}/mlruns/{sweep.experiment_id}"
    assert list((tmp_path / "mlruns").rglob("model.safetensors"))
    assert sweep.register_best_model("local-model", trial_id="l1") == "1"
    table = leaderboard_from_mlflow("sqlite:///mlflow.db", experiment="local",
                                    base_dir=tmp_path)
    assert list(table["trial_id"]) == ["l1"]


# --------------------------------------------------------------------------- own server


class OwnServer:
    """An MLflow server on a fixed port that a test may stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed by the process
        self.process = subprocess.Popen(
            [str(BIN_DIR / "mlflow"), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{self.folder / 'own.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True,
            # Without the job runner the server starts no helper processes, so it starts
            # and stops in seconds.
            env={**os.environ, **FAKE_AWS_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        wait_for_http(f"{self.uri}/health", timeout=120, process=self.process)

    def stop(self) -> None:
        """Kill the server and its workers at once, as a crash would."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def own_server(tmp_path):
    server = OwnServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def timed(call) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


@pytest.mark.slow
def test_metrics_survive_server_outage(own_server, tmp_path):
    sweep = open_sweep(tmp_path, own_server.uri)
    context = sweep.run_context
    recovered = open_trial_run(context, trial_id="recovered", params=PARAMS,
                               local_dir=tmp_path / "k")
    spilled = open_trial_run(context, trial_id="spilled", params=PARAMS,
                             local_dir=tmp_path / "s", finish_budget_s=1.0)
    for epoch in range(2):
        recovered.log_metrics({"rsum": float(epoch)}, step=epoch)
    spilled.log_metrics({"rsum": 0.0}, step=0)

    own_server.stop()
    late = open_trial_run(context, trial_id="late", params=PARAMS, local_dir=tmp_path / "l",
                          open_budget_s=1.0)
    durations = [timed(lambda e=epoch: recovered.log_metrics({"rsum": float(e)}, step=e))
                 for epoch in range(2, 5)]
    durations.append(timed(lambda: recovered.log_figure(
        plot_schedule([0, 1], {"head": [0.1, 0.2]}, ylabel="temperature"), "schedule.png")))
    durations += [timed(lambda e=epoch: spilled.log_metrics({"rsum": float(e)}, step=e))
                  for epoch in (1, 2)]
    late.log_metrics({"rsum": 7.0}, step=0)
    durations.append(timed(lambda: spilled.finish("FINISHED")))
    assert late.run_id is None
    assert max(durations) < 8
    assert spilled.unsent_metrics_path.is_file()

    own_server.start()
    recovered.finish("FINISHED")
    late.finish("FINISHED")
    imported = import_unsent_metrics(spilled.unsent_metrics_path, own_server.uri)

    client = MlflowClient(own_server.uri)
    history = client.get_metric_history(recovered.run_id, "rsum")
    assert [point.step for point in history] == [0, 1, 2, 3, 4]
    assert client.get_run(recovered.run_id).info.status == "FINISHED"
    assert [item.path for item in client.list_artifacts(recovered.run_id)] == ["schedule.png"]
    assert imported == 2
    assert [p.step for p in client.get_metric_history(spilled.run_id, "rsum")] == [0, 1, 2]
    assert client.get_run(spilled.run_id).info.status == "FINISHED"
    assert not spilled.unsent_metrics_path.exists()
    assert late.run_id is not None
    assert client.get_run(late.run_id).data.tags["mlflow.parentRunId"] == sweep.run_id
    assert [p.value for p in client.get_metric_history(late.run_id, "rsum")] == [7.0]


def test_trial_error_text_unwraps_ray_task_error() -> None:
    from ray.exceptions import RayTaskError

    from mmts_search.tracking.tune import trial_error_text

    cause = ValueError("features file items.npy not found")
    wrapped = RayTaskError("train_trial", "\x1b[36mTraceback (most recent call last)\x1b[0m ...",
                           cause)

    class FailedTrial:
        trial_id = "abc123"

        def get_error(self) -> BaseException:
            return wrapped

    text = trial_error_text(FailedTrial())

    assert text == "ValueError: features file items.npy not found"
