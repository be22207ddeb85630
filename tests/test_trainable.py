"""The trial: learning, reports, checkpoints and resume, divergence, tracking, Ray Tune."""

from __future__ import annotations

import io
import json
import math
import pickle
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mmts_search import losses
from mmts_search.spec import SweepSpec, load_sweep, midpoint_params
from workers.data import make_digits_lt
from workers.trainable import (
    CHECKPOINT_FILE,
    aggregate_values,
    combine_reports,
    load_checkpoint_state,
    run_single_trial,
    run_trial,
    split_trial_config,
    train_trial,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = PROJECT_ROOT / "search_spaces" / "demo.yaml"

REQUIRED_KEYS = (
    "epoch", "loss", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "i2t_r1", "i2t_r5",
    "i2t_r10", "i2t_medr", "rsum", "head_rsum", "mid_rsum", "tail_rsum", "tau_mean",
    "tau_min", "tau_max", "objective", "diverged",
)


def digits_spec(family: str = "mmts", **sections) -> SweepSpec:
    training = {"epochs": 3, "batch_size": 128, "lr": 2e-3, "seed": 0,
                **sections.pop("training", {})}
    return SweepSpec.model_validate({
        "name": "test",
        "datasets": [{"name": "digits", "source": "builtin:digits-lt"}],
        "training": training,
        "schedule": {"families": [family]},
        "pruner": {"kind": "none"},
        **sections,
    })


def synthetic_spec(family: str = "ts_cosine", datasets=None, **sections) -> SweepSpec:
    datasets = datasets or [{"name": "synth", "source": "builtin:synthetic-lt",
                             "n_items": 600, "dim": 16, "n_concepts": 10}]
    training = {"epochs": 2, "batch_size": 64, **sections.pop("training", {})}
    return SweepSpec.model_validate({
        "name": "test-features",
        "datasets": datasets,
        "model": {"kind": "projection", "embed_dim": 16},
        "training": training,
        "schedule": {"families": [family]},
        "pruner": {"kind": "none"},
        **sections,
    })


def run(spec: SweepSpec, family: str | None = None, **kwargs) -> list[dict]:
    family = family or spec.schedule.families[0]
    return run_trial(spec, family, midpoint_params(spec, family), report=lambda _: None,
                     **kwargs)


def numeric(report: dict) -> dict:
    return {key: value for key, value in report.items() if isinstance(value, float)}


# --------------------------------------------------------------------------------------
# Learning, reports and the single-trial command
# --------------------------------------------------------------------------------------


def test_demo_trial_learns_within_a_minute(tmp_path):
    if not DEMO_SPEC.is_file():
        pytest.skip("search_spaces/demo.yaml not found")
    spec = load_sweep(DEMO_SPEC)
    output = tmp_path / "metrics.json"
    buffer = io.StringIO()

    started = time.perf_counter()
    result = run_single_trial(spec, output=output, console=Console(file=buffer, width=100))
    elapsed = time.perf_counter() - started

    epochs = result["epochs"]
    test_size = make_digits_lt(test_per_class=30).test.num_items
    chance_rsum = 2 * 100 * (1 + 5 + 10) / test_size
    assert len(epochs) == spec.training.epochs
    assert epochs[-1]["rsum"] > epochs[0]["rsum"] + 20
    assert epochs[-1]["rsum"] > 4 * chance_rsum
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert elapsed < 60

    written = json.loads(output.read_text())
    assert written["config"] == result["config"]
    assert written["config"]["family"] == spec.schedule.families[0]
    assert [entry["epoch"] for entry in written["epochs"]] == list(range(1, 9))
    assert "objective" in buffer.getvalue()
    assert "metrics written to" in buffer.getvalue()


def test_report_names_and_values():
    spec = digits_spec("mmts", training={"epochs": 1})
    params = midpoint_params(spec, "mmts")
    reports: list[dict] = []
    history = run_trial(spec, "mmts", params, report=reports.append)

    assert history == reports
    report = reports[0]
    for key in REQUIRED_KEYS:
        assert key in report, key
    for key in ("map", "ndcg", "cls_rsum", "head_t2i_r1", "tail_i2t_r10"):
        assert key in report, key
    assert report["epoch"] == 1.0
    assert report["diverged"] == 0.0
    assert report["objective"] == report["rsum"]
    assert all(isinstance(value, float) for value in report.values())

    low = params["shift_min"] - params["alpha"] / 2
    high = params["shift_max"] + params["alpha"] / 2
    assert low - 1e-6 <= report["tau_min"] <= report["tau_mean"] <= report["tau_max"] <= high + 1e-6


def test_single_trial_params_and_family():
    spec = digits_spec("mmts", training={"epochs": 1})
    result = run_single_trial(spec, family="mmts", params={"alpha": 0.05},
                              console=Console(file=io.StringIO()))

    assert result["config"]["family"] == "mmts"
    assert result["config"]["alpha"] == 0.05
    assert len(result["epochs"]) == 1
    with pytest.raises(ValueError, match="has no parameter"):
        run_single_trial(spec, family="mmts", params={"tau": 0.1},
                         console=Console(file=io.StringIO()))


def test_max_margin_uses_schedule_as_margin():
    spec = digits_spec("ts_cosine", loss="max_margin", training={"epochs": 1})
    params = {"tau_min": 0.1, "tau_max": 0.3, "oscillations": 1}
    report = run_trial(spec, "ts_cosine", params, report=lambda _: None)[0]

    assert report["diverged"] == 0.0
    assert math.isfinite(report["loss"])
    assert report["tau_max"] == pytest.approx(0.3, abs=1e-6)
    assert 0.1 <= report["tau_min"] < 0.3


def test_features_trial_with_projection():
    history = run(synthetic_spec())

    assert len(history) == 2
    assert "map" in history[-1]
    assert history[-1]["rsum"] > history[0]["rsum"] * 0.8
    assert history[-1]["diverged"] == 0.0


def test_learnable_family_trains_temperature():
    spec = digits_spec("learnable", training={"epochs": 2, "lr": 0.01})
    history = run_trial(spec, "learnable", {"tau_init": 0.1}, report=lambda _: None)

    assert history[-1]["diverged"] == 0.0
    assert history[-1]["tau_mean"] != pytest.approx(0.1, abs=1e-4)


def test_save_model_writes_weights(tmp_path):
    spec = digits_spec("constant", training={"epochs": 1, "save_model": True})
    run(spec, checkpoint_dir=tmp_path)

    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "artifacts" / "model" / "model.safetensors"))
    assert any(key.startswith("item_encoder.") for key in weights)
    assert (tmp_path / "artifacts" / "schedule.png").stat().st_size > 1000
    final = json.loads((tmp_path / "artifacts" / "final_metrics.json").read_text())
    assert final["final"]["epoch"] == 1


# --------------------------------------------------------------------------------------
# Several datasets in one trial
# --------------------------------------------------------------------------------------


def test_aggregate_values():
    assert aggregate_values([1.0, 2.0, 6.0], [1, 1, 1], "mean") == 3.0
    assert aggregate_values([1.0, 2.0, 6.0], [1, 1, 1], "min") == 1.0
    assert aggregate_values([1.0, 2.0, 6.0], [1, 1, 1], "median") == 2.0
    assert aggregate_values([1.0, 5.0], [3, 1], "weighted_mean") == 2.0
    with pytest.raises(ValueError, match="objective.aggregate"):
        aggregate_values([1.0], [1.0], "max")


def test_combine_reports_prefixes():
    combined = combine_reports(
        {"a": {"rsum": 10.0, "map": 4.0}, "b": {"rsum": 30.0}},
        {"a": 1.0, "b": 1.0}, "mean",
    )
    assert combined == {"rsum": 20.0, "map": 4.0, "a/rsum": 10.0, "a/map": 4.0,
                        "b/rsum": 30.0}
    single = combine_reports({"a": {"rsum": 10.0}}, {"a": 1.0}, "mean")
    assert single == {"rsum": 10.0}


@pytest.mark.parametrize("aggregate", ["weighted_mean", "min"])
def test_two_datasets_interleaved(aggregate):
    datasets = [
        {"name": "small", "source": "builtin:synthetic-lt", "n_items": 300, "dim": 16,
         "n_concepts": 6, "weight": 1.0},
        {"name": "large", "source": "builtin:synthetic-lt", "n_items": 500, "dim": 16,
         "n_concepts": 10, "seed": 3, "weight": 3.0},
    ]
    spec = synthetic_spec(datasets=datasets, objective={"metric": "rsum",
                                                        "aggregate": aggregate})
    report = run(spec)[-1]

    small, large = report["small/rsum"], report["large/rsum"]
    expected = (small + 3 * large) / 4 if aggregate == "weighted_mean" else min(small, large)
    assert report["objective"] == pytest.approx(expected)
    assert report["rsum"] == pytest.approx(expected)
    assert "small/tau_mean" in report
    assert "large/map" in report
    assert report["epoch"] == 2.0


# --------------------------------------------------------------------------------------
# Determinism, checkpoints and resume
# --------------------------------------------------------------------------------------


def test_same_config_same_metrics():
    spec = digits_spec("mmts", training={"epochs": 2})
    assert run(spec) == run(spec)


def test_different_seed_different_metrics():
    first = run(digits_spec("mmts", training={"epochs": 1, "seed": 0}))
    second = run(digits_spec("mmts", training={"epochs": 1, "seed": 1}))
    assert first[0]["loss"] != second[0]["loss"]


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["mmts", "learnable"])
def test_resume_matches_uninterrupted(tmp_path, family):
    spec = digits_spec(family, training={"epochs": 3, "lr": 0.005})
    params = midpoint_params(spec, family)
    uninterrupted = run_trial(spec, family, params, report=lambda _: None,
                              checkpoint_dir=tmp_path / "full")

    def crash_after_epoch_two(report: dict) -> None:
        if report["epoch"] == 2:
            raise SimulatedCrash("worker lost after epoch 2")

    with pytest.raises(SimulatedCrash):
        run_trial(spec, family, params, report=crash_after_epoch_two,
                  checkpoint_dir=tmp_path / "resumed")
    assert load_checkpoint_state(tmp_path / "resumed" / CHECKPOINT_FILE)["epoch"] == 2

    reported: list[dict] = []
    resumed = run_trial(spec, family, params, report=reported.append,
                        checkpoint_dir=tmp_path / "resumed")

    assert [report["epoch"] for report in reported] == [3.0]
    assert reported[0] == uninterrupted[2]
    assert resumed == uninterrupted


def test_resume_rejects_other_config(tmp_path):
    spec = digits_spec("constant", training={"epochs": 1})
    run_trial(spec, "constant", {"tau": 0.1}, report=lambda _: None, checkpoint_dir=tmp_path)

    with pytest.raises(ValueError, match="the checkpoint belongs to family 'constant'"):
        run_trial(spec, "constant", {"tau": 0.2}, report=lambda _: None,
                  checkpoint_dir=tmp_path)


def test_checkpoint_load_rejects_pickled_objects(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    torch.save({"version": 1, "payload": SimulatedCrash("not a tensor")}, path)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        load_checkpoint_state(path)


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------


def assert_diverged(history: list[dict], fragment: str) -> None:
    last = history[-1]
    assert last["diverged"] == 1.0
    assert fragment in last["error"]
    assert "training.lr" in last["error"]
    assert math.isnan(last["objective"])
    for key in REQUIRED_KEYS:
        assert key in last, key
    assert all(report["diverged"] == 0.0 for report in history[:-1])


@pytest.mark.parametrize(("family", "lr", "fragment"), [
    ("constant", 1e6, "the training loss became non-finite"),
    ("learnable", 1e30, "the temperature became non-finite"),
])
def test_huge_lr_diverges_cleanly(family, lr, fragment):
    spec = digits_spec(family, training={"epochs": 3, "lr": lr})
    history = run(spec)

    assert len(history) == 1
    assert_diverged(history, fragment)


def test_forced_nan_ends_trial(monkeypatch):
    calls = {"count": 0}
    original = losses.info_nce

    def nan_on_eighth_call(image_emb, text_emb, tau):
        calls["count"] += 1
        loss = original(image_emb, text_emb, tau)
        return loss * float("nan") if calls["count"] == 8 else loss

    monkeypatch.setattr(losses, "info_nce", nan_on_eighth_call)
    spec = digits_spec("mmts", training={"epochs": 3})
    history = run(spec)

    # digits-lt has 585 training captions: 5 batches per epoch, so call 8 is in epoch 2.
    assert [report["epoch"] for report in history] == [1.0, 2.0]
    assert_diverged(history, "in epoch 2 after 7 optimizer steps")


# --------------------------------------------------------------------------------------
# Tracking: a real MLflow server (artifacts in the local S3 endpoint)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trial_logs_child_run(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(f"worker-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment_id, run_name="sweep")
    context = {"tracking_uri": mlflow_server.uri, "experiment_id": experiment_id,
               "parent_run_id": parent.info.run_id, "sweep_name": "test"}
    spec = digits_spec("mmts", training={"epochs": 2})
    run(spec, run_context=context, trial_id="trial-ok")
    diverged_spec = digits_spec("constant", training={"epochs": 2, "lr": 1e6})
    run(diverged_spec, run_context=context, trial_id="trial-diverged")

    def child(trial_id: str):
        runs = client.search_runs([experiment_id],
                                  filter_string=f"tags.`mmts.trial_id` = '{trial_id}'")
        assert len(runs) == 1
        return runs[0]

    finished = child("trial-ok")
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert finished.data.params["family"] == "mmts"
    history = client.get_metric_history(finished.info.run_id, "rsum")
    assert sorted(metric.step for metric in history) == [1, 2]
    artifacts = {item.path for item in client.list_artifacts(finished.info.run_id)}
    assert {"schedule.png", "final_metrics.json"} <= artifacts

    failed = child("trial-diverged")
    assert failed.info.status == "FAILED"
    assert "non-finite" in failed.data.tags["error"]
    assert failed.data.metrics["diverged"] == 1.0


# --------------------------------------------------------------------------------------
# Ray Tune: a retried trial resumes from its checkpoint
# --------------------------------------------------------------------------------------

FLAKY_FACTORY = '''
from pathlib import Path

from torch import nn

from workers.models import BagOfWordsTextEncoder, ConvImageEncoder


class FailOnce(nn.Module):
    """Raise once, at the given training forward call, unless the marker file exists.

    After the crash, each training call writes this instance's call count to
    ``<marker>.retry_calls``, so a test can tell how many steps the retry trained.
    """

    def __init__(self, inner, fail_at_call, marker):
        super().__init__()
        self.inner = inner
        self.fail_at_call = fail_at_call
        self.marker = Path(marker)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.marker.exists():
                Path(f"{self.marker}.retry_calls").write_text(str(self.calls))
            elif self.calls == self.fail_at_call:
                self.marker.touch()
                raise RuntimeError("simulated worker crash")
        return self.inner(x)


def build(data, *, embed_dim, fail_at_call, marker):
    channels, height, width = data.item_shape
    items = ConvImageEncoder(channels, height, width, embed_dim, hidden_dim=64)
    texts = BagOfWordsTextEncoder(data.vocab_size, embed_dim, hidden_dim=64)
    return FailOnce(items, fail_at_call, marker), texts
'''


@pytest.mark.slow
def test_tune_retry_resumes_from_checkpoint(tmp_path, monkeypatch):
    import ray
    from ray import tune

    module = f"flaky_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FLAKY_FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "crashed"
    steps_per_epoch = math.ceil(make_digits_lt(seed=0).train.num_texts / 128)
    spec = digits_spec("mmts", training={"epochs": 3}, model={
        "kind": "factory", "factory": f"{module}:build", "embed_dim": 32,
        "factory_kwargs": {"fail_at_call": 2 * steps_per_epoch + 1, "marker": str(marker)},
    })
    params = midpoint_params(spec, "mmts")

    # A local Ray instance started here, like the embedded default of `mmts-search run`;
    # the factory module reaches its workers through PYTHONPATH.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}})
    try:
        tuner = tune.Tuner(
            tune.with_parameters(train_trial, sweep=spec.model_dump(mode="json"),
                                 run_context=None),
            param_space={"family": "mmts", **params, "optuna_trial_number": 0},
            tune_config=tune.TuneConfig(num_samples=1, metric="objective", mode="max"),
            run_config=tune.RunConfig(
                name="resume", storage_path=str(tmp_path / "ray"),
                failure_config=tune.FailureConfig(max_failures=1), verbose=0,
            ),
        )
        result = tuner.fit()[0]
    finally:
        ray.shutdown()

    assert marker.exists(), "the first attempt did not crash"
    assert result.error is None
    assert result.checkpoint is not None
    assert result.metrics["epoch"] == 3.0
    # Tune restores the latest checkpoint it has registered: usually epoch 2, epoch 1 when
    # the crash comes before the driver has processed the epoch-2 report. Either way the
    # retry trains at most two epochs, never all three again.
    retry_calls = int(Path(f"{marker}.retry_calls").read_text())
    assert steps_per_epoch <= retry_calls <= 2 * steps_per_epoch

    # The same trial in this process, without a crash (the marker exists now).
    uninterrupted = run_trial(spec, "mmts", params, report=lambda _: None)
    for key, value in numeric(uninterrupted[2]).items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------------------
# Trial config
# --------------------------------------------------------------------------------------


def test_split_trial_config():
    family, params = split_trial_config(
        {"family": "mmts", "alpha": 0.1, "oscillations": 2, "shift_min": 0.08,
         "shift_max": 0.3, "optuna_trial_number": 3})
    assert family == "mmts"
    assert params == {"alpha": 0.1, "oscillations": 2, "shift_min": 0.08, "shift_max": 0.3}

    with pytest.raises(ValueError, match="must name a schedule family"):
        split_trial_config({"tau": 0.1})
    with pytest.raises(ValueError, match="lacks tau_max"):
        split_trial_config({"family": "ts_cosine", "tau_min": 0.1, "oscillations": 1})
