"""A real sweep against a real MLflow server whose artifacts go to a local S3 endpoint.

The sweep trains on digits-lt with the real worker. Its trial checkpoints go to the same S3
endpoint. The two temperature choices learn at clearly different speeds, and with seed 0
the random sampler draws the slower one after a faster trial has completed, so the median
pruner stops it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from mlflow.entities import ViewType

from mmts_search.search.driver import run_sweep
from mmts_search.spec import parse_sweep

SWEEP = """
name: tracked
datasets: [{{name: digits, source: 'builtin:digits-lt'}}]
model: {{kind: small-encoders, embed_dim: 32}}
training: {{epochs: 3, batch_size: 128, lr: 0.003, seed: 0}}
schedule:
  families: [constant]
  tau: [0.1, 20.0]
search: {{algorithm: random, num_samples: {num_samples}, max_concurrent: 1, seed: 0}}
pruner: {{kind: median, grace_epochs: 1}}
objective: {{metric: rsum, mode: max}}
tracking: {{uri: '{uri}', experiment: e2e-tracking}}
storage: {storage}
"""
NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, s3_endpoint, tmp_path_factory):
    """Run the sweep once; yield (outcome, MlflowClient, artifact bucket, results bucket)."""
    results_bucket = s3_endpoint.create_bucket("results")
    spec = parse_sweep(SWEEP.format(num_samples=NUM_SAMPLES, uri=mlflow_server.uri,
                                    storage=f"s3://{results_bucket}/sweeps"))
    workdir = tmp_path_factory.mktemp("tracked-sweep")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.url)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint.url,
                                       "PYTHONPATH": str(Path(__file__).parents[1])}})
    try:
        outcome = run_sweep(spec)
    finally:
        ray.shutdown()
        monkeypatch.undo()
    yield outcome, MlflowClient(mlflow_server.uri), mlflow_server.artifact_bucket, results_bucket


def children_of(client: MlflowClient, parent_run_id: str, experiment_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        run_view_type=ViewType.ALL, max_results=100,
    )


def s3_keys(s3_endpoint, bucket: str) -> list[str]:
    paginator = s3_endpoint.client().get_paginator("list_objects_v2")
    return [item["Key"] for page in paginator.paginate(Bucket=bucket)
            for item in page.get("Contents", [])]


@pytest.mark.slow
def test_sweep_has_one_parent_and_nested_children(tracked_sweep) -> None:
    outcome, client, _, _ = tracked_sweep
    experiment = client.get_experiment_by_name("e2e-tracking")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`mmts.role` = 'parent'",
                                 run_view_type=ViewType.ALL)
    children = children_of(client, outcome.parent_run_id, experiment.experiment_id)

    assert [run.info.run_id for run in parents] == [outcome.parent_run_id]
    assert len(children) == NUM_SAMPLES
    assert all(run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
               for run in children)
    assert not [run for run in [*parents, *children] if run.info.status == "RUNNING"]


@pytest.mark.slow
def test_pruned_children_are_killed_and_tagged(tracked_sweep) -> None:
    outcome, client, _, _ = tracked_sweep
    children = children_of(client, outcome.parent_run_id, outcome_experiment(client))
    statuses = Counter(run.info.status for run in children)
    pruned = [run for run in children if run.data.tags.get("pruned") == "true"]

    assert statuses["FINISHED"] >= 1
    assert len(pruned) >= 1, f"no trial was pruned: {statuses}"
    for run in pruned:
        assert run.info.status == "KILLED"
        assert int(run.data.tags["pruned_epoch"]) < 3
        epoch = int(run.data.tags["pruned_epoch"])
        value = client.get_metric_history(run.info.run_id, "rsum")[-1].value
        finished = [client.get_metric_history(other.info.run_id, "rsum")[epoch - 1].value
                    for other in children if other.info.status == "FINISHED"]
        assert value < max(finished)


def outcome_experiment(client: MlflowClient) -> str:
    return client.get_experiment_by_name("e2e-tracking").experiment_id


@pytest.mark.slow
def test_learning_curves_have_one_point_per_epoch(tracked_sweep) -> None:
    outcome, client, _, _ = tracked_sweep
    for run in children_of(client, outcome.parent_run_id, outcome_experiment(client)):
        history = client.get_metric_history(run.info.run_id, "rsum")
        steps = [point.step for point in history]
        expected = 3 if run.info.status == "FINISHED" else int(run.data.tags["pruned_epoch"])

        assert steps == list(range(1, expected + 1)), run.info.run_id


@pytest.mark.slow
def test_artifacts_land_in_s3(tracked_sweep, s3_endpoint) -> None:
    outcome, client, artifact_bucket, results_bucket = tracked_sweep
    keys = s3_keys(s3_endpoint, artifact_bucket)
    children = children_of(client, outcome.parent_run_id, outcome_experiment(client))
    parent_files = {item.path for item in client.list_artifacts(outcome.parent_run_id)}

    for run in children:
        assert any(key.endswith(f"{run.info.run_id}/artifacts/schedule.png") for key in keys), (
            f"no schedule.png in s3://{artifact_bucket} for child {run.info.run_id}")
    assert {"leaderboard.csv", "best_config.yaml", "plots"} <= parent_files, parent_files
    assert any(key.startswith(f"{outcome.parent_run_id}") or outcome.parent_run_id in key
               for key in keys if key.endswith("leaderboard.csv"))
    assert any("checkpoint" in key for key in s3_keys(s3_endpoint, results_bucket)), (
        "no trial checkpoint in the results bucket")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

