"""Shared fixtures: real services on 127.0.0.1 for the tests that need them.

CI (`.ci/run`) starts one S3 endpoint (moto server), one MLflow server and one Ray head
before the tests and passes their addresses in environment variables. Outside CI each
fixture starts its own service on a free port the first time a test requests it, and stops
it at the end of the session.

Environment variables read here:

- ``MMTS_TEST_S3_ENDPOINT``: URL of an S3 endpoint, for example ``http://127.0.0.1:9000``.
- ``MMTS_TEST_MLFLOW_URI``: URL of an MLflow server whose artifacts go to S3 at that endpoint.
- ``MMTS_TEST_MLFLOW_BUCKET``: the artifact bucket of that server (default ``mlflow``).
- ``MMTS_TEST_RAY_ADDRESS``: GCS address of a Ray head, for example ``127.0.0.1:6379``.
- ``MMTS_TEST_RAY_DASHBOARD``: its dashboard and Jobs API URL, ``http://127.0.0.1:8265``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent

# Fake credentials for the local S3 endpoint. They are set before any boto3 client is
# made, so that no test ever reads credentials from the machine it runs on.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for _key, _value in FAKE_AWS_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def shared_data_dir() -> Path | None:
    """Return the real-data folder (``../shared/data`` beside the project), or None."""
    configured = os.environ.get("MMTS_SHARED_DATA")
    path = Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; skips the test when it is absent (as in a user's clone)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: expected ../shared/data beside the project "
                    "or MMTS_SHARED_DATA")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it responds with any HTTP status; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service for {url} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as error:
            last_error = error
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s: {last_error}")


def stop_process(process: subprocess.Popen, *, timeout: float = 20) -> None:
    """Stop a service started with ``start_new_session=True``, with its children."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@dataclass
class S3Endpoint:
    """A running S3 endpoint on 127.0.0.1."""

    url: str

    def client(self):  # noqa: ANN201 - boto3 client types are generated at run time
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@dataclass
class MlflowServer:
    """A running MLflow tracking server whose artifacts go to S3."""

    uri: str
    artifact_bucket: str
    s3: S3Endpoint


@dataclass
class RayHead:
    """A running Ray head node: GCS address and dashboard (Jobs API) URL."""

    gcs_address: str
    dashboard_url: str


@pytest.fixture(scope="session")
def tmp_services(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_services: Path) -> Iterator[S3Endpoint]:
    """A real S3 endpoint (moto server) on 127.0.0.1."""
    configured = os.environ.get("MMTS_TEST_S3_ENDPOINT")
    if configured:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = configured
        yield S3Endpoint(configured)
        return

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_services / "moto.log", "wb")  # noqa: SIM115 - closed after the session
    process = subprocess.Popen(
        [str(BIN_DIR / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"{url}/moto-api/", timeout=30, process=process)
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = url
        yield S3Endpoint(url)
    finally:
        stop_process(process)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: S3Endpoint, tmp_services: Path) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` with a SQLite backend and artifacts in the S3 endpoint."""
    configured = os.environ.get("MMTS_TEST_MLFLOW_URI")
    if configured:
        bucket = os.environ.get("MMTS_TEST_MLFLOW_BUCKET", "mlflow")
        yield MlflowServer(configured, bucket, s3_endpoint)
        return

    bucket = s3_endpoint.create_bucket("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, **FAKE_AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.url,
        # The job runner starts extra processes and slows shutdown; no test uses it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = open(tmp_services / "mlflow.log", "wb")  # noqa: SIM115 - closed after the session
    process = subprocess.Popen(
        [
            str(BIN_DIR / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_services / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{bucket}/mlflow",
            "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        wait_for_http(f"{uri}/health", timeout=120, process=process)
        yield MlflowServer(uri, bucket, s3_endpoint)
    finally:
        stop_process(process)
        log.close()


@pytest.fixture(scope="session")
def ray_head(tmp_services: Path) -> Iterator[RayHead]:
    """A real Ray head node (``ray start --head``) with the dashboard and Jobs API."""
    address = os.environ.get("MMTS_TEST_RAY_ADDRESS")
    dashboard = os.environ.get("MMTS_TEST_RAY_DASHBOARD")
    if address and dashboard:
        yield RayHead(address, dashboard)
        return

    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    log = open(tmp_services / "ray-head.log", "wb")  # noqa: SIM115 - closed after the session
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
    temp_dir = Path("/tmp") / f"ray-test-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [
            str(BIN_DIR / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
            # Other local Ray instances take the default agent port, and without an
            # agent the head accepts no jobs.
            "--dashboard-agent-listen-port", str(agent_port),
            "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
            "--temp-dir", str(temp_dir), "--disable-usage-stats",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_http(f"{dashboard_url}/api/version", timeout=120, process=process)
        yield RayHead(f"127.0.0.1:{gcs_port}", dashboard_url)
    finally:
        # `ray start --block` ignores SIGTERM in Ray 2.60, so do not wait long for it.
        stop_process(process, timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
