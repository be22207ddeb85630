"""Submitting sweeps through the Ray Jobs API: token handling, errors, and a real job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import optuna
import pytest
import requests
from optuna.trial import TrialState

from mmts_search.search import submit
from mmts_search.search.submit import (
    AuthToken,
    SubmitError,
    auth_headers,
    build_runtime_env,
    find_auth_token,
    get_job_logs,
    get_job_state,
    submission_warnings,
    submit_sweep,
    wait_for_job,
)
from mmts_search.spec import load_sweep

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO = PROJECT_ROOT / "search_spaces" / "demo.yaml"
CLI = Path(sys.executable).parent / "mmts-search"
SECRET = "s3cr3t-token-value"


# --------------------------------------------------------------------------------------
# Token lookup
# --------------------------------------------------------------------------------------


def test_token_from_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    token_file = tmp_path / "other"
    token_file.write_text("from-path\n")

    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert find_auth_token(env, home=tmp_path).value == "from-env"

    env = {"RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert find_auth_token(env, home=tmp_path).value == "from-path"

    token = find_auth_token({}, home=tmp_path)
    assert token.value == "from-file"
    assert token.source == str(tmp_path / ".ray" / "auth_token")


def test_no_token_found(tmp_path: Path) -> None:
    assert find_auth_token({}, home=tmp_path) is None
    assert auth_headers(None) == {}


def test_token_value_is_hidden_from_repr() -> None:
    token = AuthToken(SECRET, "the RAY_AUTH_TOKEN variable")
    assert SECRET not in repr(token)
    assert auth_headers(token) == {"Authorization": f"Bearer {SECRET}"}


# --------------------------------------------------------------------------------------
# A Jobs API stand-in that demands a token, to check the error paths
# --------------------------------------------------------------------------------------


class TokenJobsHandler(BaseHTTPRequestHandler):
    """Responds like a Ray dashboard with token authentication enabled."""

    seen_headers: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        type(self).seen_headers.append(self.headers.get("Authorization"))
        if self.path == "/api/version":
            self._send(200, {"ray_version": "2.60.0", "version": "2.60.0",
                             "ray_commit": "x", "session_name": "fake"})
            return
        auth = self.headers.get("Authorization")
        if not auth:
            self._send_text(401, "Unauthorized: Missing authentication token")
        elif auth != f"Bearer {SECRET}":
            self._send_text(403, "Forbidden: Invalid authentication token")
        else:
            self._send_text(404, "Job does not exist")

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture()
def token_server() -> Iterator[str]:
    TokenJobsHandler.seen_headers = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenJobsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment without any Ray token, with ``home`` as the home folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "HOME": str(home), **extra}


def test_missing_token_gives_clear_error(token_server: str, tmp_path: Path) -> None:
    done = subprocess.run([str(CLI), "jobs", "status", "mmts-x", "--address", token_server],
                          env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "requires token authentication" in done.stderr
    assert "~/.ray/auth_token" in done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr
    assert token_server in done.stderr


def test_wrong_token_is_reported_without_its_value(token_server: str, tmp_path: Path) -> None:
    done = subprocess.run([str(CLI), "jobs", "status", "mmts-x", "--address", token_server],
                          env=isolated_env(tmp_path, RAY_AUTH_TOKEN="wrong-token-value"),
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "the token from the RAY_AUTH_TOKEN variable" in done.stderr
    assert "wrong-token-value" not in done.stderr + done.stdout


def test_token_is_sent_as_bearer_header(token_server: str, tmp_path: Path) -> None:
    done = subprocess.run([str(CLI), "jobs", "status", "mmts-x", "--address", token_server],
                          env=isolated_env(tmp_path, RAY_AUTH_TOKEN=SECRET),
                          capture_output=True, text=True, timeout=120)

    # With the right token, the stand-in returns 404: the job does not exist.
    assert done.returncode == 1
    assert "job mmts-x not found" in done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert f"Bearer {SECRET}" in TokenJobsHandler.seen_headers


def test_unreachable_address_names_it() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"http://127.0.0.1:{port}"

    with pytest.raises(SubmitError, match=f"cannot reach the Ray Jobs API at {address}"):
        get_job_state(address, "mmts-x")


# --------------------------------------------------------------------------------------
# Runtime environment
# --------------------------------------------------------------------------------------


def test_runtime_env_carries_code_and_no_secrets(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-forward")

    runtime_env = build_runtime_env(tmp_path)

    assert runtime_env["working_dir"] == str(tmp_path)
    names = sorted(Path(folder).name for folder in runtime_env["py_modules"])
    assert names == ["mmts_search", "workers"]
    assert all(Path(folder).is_dir() for folder in runtime_env["py_modules"])
    assert ".venv" in runtime_env["excludes"]
    assert "__pycache__" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env["env_vars"]


def test_relative_paths_are_warned_about() -> None:
    spec = load_sweep(DEMO)
    warnings = submission_warnings(spec)
    assert any("storage './mmts-results' is relative" in w for w in warnings)
    assert any("tracking.uri 'sqlite:///mlflow.db' is relative" in w for w in warnings)

    spec = load_sweep(DEMO, ["storage=/srv/results", "tracking.uri=http://127.0.0.1:5000"])
    assert submission_warnings(spec) == []

    spec = load_sweep(DEMO, ["storage=/srv/results", "tracking.uri=http://127.0.0.1:5000",
                             "datasets=[{name: f, source: features, path: feats, "
                             "concepts: {kind: labels}}]"])
    assert submission_warnings(spec) == [
        "dataset f: path 'feats' is relative, so the job looks for it in its working "
        "folder, which contains only sweep.yaml. Use an absolute path that the cluster can "
        "read, or s3://bucket/prefix."
    ]


def test_normalize_address_adds_scheme() -> None:
    assert submit.normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    with pytest.raises(SubmitError, match="empty"):
        submit.normalize_address(" ")


# --------------------------------------------------------------------------------------
# A real sweep on the Ray head of the test session
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_runs_sweep_on_ray_head(ray_head: object, tmp_path: Path) -> None:
    results = tmp_path / "results"
    spec = load_sweep(DEMO, [
        "name=submitted", f"storage={results}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "search.num_samples=2", "search.max_concurrent=2", "training.epochs=1",
        "pruner.kind=none",
    ])

    job_id = submit_sweep(spec, address=ray_head.dashboard_url)
    state = wait_for_job(ray_head.dashboard_url, job_id, timeout_s=400, poll_s=2)
    logs = get_job_logs(ray_head.dashboard_url, job_id)

    assert state.status == "SUCCEEDED", logs[-4000:]
    assert "python -m mmts_search run sweep.yaml --address auto" in state.entrypoint
    assert "Top 2 of 2 trials" in logs
    assert (results / "submitted" / "best.yaml").is_file()
    study = optuna.load_study(study_name="submitted",
                              storage=f"sqlite:///{results / 'submitted' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2

    status = subprocess.run([str(CLI), "jobs", "status", job_id, "--address",
                             ray_head.dashboard_url], capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout


@pytest.mark.slow
def test_real_head_without_token_gives_clear_error(ray_head: object, tmp_path: Path) -> None:
    probe = requests.get(f"{ray_head.dashboard_url}/api/jobs/", timeout=30)
    if probe.status_code not in (401, 403):
        pytest.skip("this Ray head does not use token authentication")

    done = subprocess.run([str(CLI), "jobs", "status", "mmts-x", "--address",
                           ray_head.dashboard_url], env=isolated_env(tmp_path),
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "requires token authentication" in done.stderr
    assert "Traceback" not in done.stderr


CLUSTER_SWEEP = """
name: cluster-e2e
datasets: [{{name: digits, source: 'builtin:digits-lt'}}]
model: {{kind: small-encoders, embed_dim: 32}}
training: {{epochs: 2, seed: 0}}
schedule:
  families: [constant, mmts]
  tau: {{low: 0.05, high: 0.2}}
  alpha: {{low: 0.0, high: 0.1}}
  oscillations: 2
  shift_min: {{low: 0.06, high: 0.1}}
  shift_max: {{low: 0.2, high: 0.3}}
search: {{algorithm: random, num_samples: 2, max_concurrent: 2, seed: 0}}
pruner: {{kind: none}}
tracking: {{uri: '{uri}', experiment: cluster-e2e}}
storage: s3://{bucket}/sweeps
"""


@pytest.mark.slow
def test_cli_submit_tracks_to_server_and_s3(ray_head: object, mlflow_server: object,
                                            s3_endpoint: object, tmp_path: Path) -> None:
    """The cluster user's path: submit, the job trains, MLflow and S3 hold the results."""
    from mlflow import MlflowClient

    bucket = s3_endpoint.create_bucket("cluster")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(CLUSTER_SWEEP.format(uri=mlflow_server.uri, bucket=bucket))
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint.url}

    result = subprocess.run(
        [str(CLI), "submit", str(sweep_file), "--address", ray_head.dashboard_url, "--wait"],
        capture_output=True, text=True, timeout=600, env=env,
    )

    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("cluster-e2e")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    parents = [run for run in runs if run.data.tags.get("mmts.role") == "parent"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1
    assert len(children) == 2
    assert {run.info.status for run in [*parents, *children]} == {"FINISHED"}

    keys = [item["Key"] for item in s3_endpoint.client().list_objects_v2(
        Bucket=bucket, Prefix="sweeps/cluster-e2e/")["Contents"]]
    assert any("checkpoint_" in key for key in keys), keys[:20]
    assert "sweeps/cluster-e2e/best.yaml" in keys
    pages = s3_endpoint.client().get_paginator("list_objects_v2").paginate(
        Bucket=mlflow_server.artifact_bucket)
    artifact_keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    for child in children:
        assert any(key.endswith(f"{child.info.run_id}/artifacts/schedule.png")
                   for key in artifact_keys)
