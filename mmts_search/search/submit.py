"""Submit a sweep to a Ray cluster through the Ray Jobs API, and follow the job.

The job runs ``python -m mmts_search run sweep.yaml --address auto`` with the cluster's
``python``. Its runtime environment carries the code and the sweep:

- ``working_dir``: a temporary folder holding only ``sweep.yaml``, the resolved sweep file
  (overrides applied), so nothing else of the submitting machine is uploaded;
- ``py_modules``: the ``mmts_search`` and ``workers`` packages of this installation
  (without ``__pycache__``), so the cluster runs the same code as the submitter;
- ``env_vars``: the S3 endpoint and region variables that are set here. Credentials are
  never forwarded: the cluster uses its own.

Token authentication: a Ray cluster may require ``Authorization: Bearer <token>`` on every
Jobs API request (``RAY_AUTH_MODE=token``). The token is read from ``RAY_AUTH_TOKEN``, from
the file named by ``RAY_AUTH_TOKEN_PATH``, or from ``~/.ray/auth_token``, in that order.
It is sent only as that header, and never logged or printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AuthToken",
    "JobState",
    "SubmitError",
    "auth_headers",
    "find_auth_token",
    "follow_job_logs",
    "get_job_logs",
    "get_job_state",
    "jobs_client",
    "stop_job",
    "submit_sweep",
    "wait_for_job",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")

# Variables forwarded to the job: where S3 is, never who may use it.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION")
UPLOAD_EXCLUDES = ["__pycache__", "*.pyc", ".venv", ".git", "mlflow.db", "mmts-results"]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# How long `submit_sweep` waits for the job agent of a head that has just started.
AGENT_WAIT_S = 60.0


class SubmitError(RuntimeError):
    """A Jobs API request failed; the message names the address and what to do next."""


@dataclass(frozen=True)
class AuthToken:
    """A Ray authentication token and where it was found (the value is never shown)."""

    value: str = field(repr=False)
    source: str


@dataclass(frozen=True)
class JobState:
    """Status of a submitted job: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or
    ``STOPPED``, with Ray's message about it."""

    job_id: str
    status: str
    message: str = ""
    entrypoint: str = ""

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (succeeded, failed or stopped)."""
        return self.status in TERMINAL_STATES


def find_auth_token(env: Mapping[str, str] | None = None, *,
                    home: Path | None = None) -> AuthToken | None:
    """Return the Ray authentication token, or None when none is configured.

    Args:
        env: environment to read (default: ``os.environ``).
        home: home folder for ``~/.ray/auth_token`` (default: the user's).
    """
    env = os.environ if env is None else env
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return AuthToken(value, f"the {TOKEN_ENV} variable")

    configured = env.get(TOKEN_PATH_ENV)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                return AuthToken(value, str(path))
        logger.warning("%s points to %s, which contains no token", TOKEN_PATH_ENV, path)

    default = (home / ".ray" / "auth_token") if home else DEFAULT_TOKEN_PATH.expanduser()
    if default.is_file():
        value = default.read_text(encoding="utf-8").strip()
        if value:
            return AuthToken(value, str(default))
    return None


def auth_headers(token: AuthToken | None) -> dict[str, str]:
    """Return the ``Authorization`` header for ``token`` (empty without a token)."""
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def missing_token_message(address: str) -> str:
    """Return the error for a cluster that demands a token when none is configured."""
    return (
        f"The Ray cluster at {address} requires token authentication, and no token was "
        f"found. Put the cluster's token in ~/.ray/auth_token, or set {TOKEN_ENV} to it, "
        f"or set {TOKEN_PATH_ENV} to a file that holds it. On the head node, "
        "`ray get-auth-token` prints the token."
    )


def normalize_address(address: str) -> str:
    """Return the Jobs API URL: ``http://`` is added when no scheme is given."""
    address = address.strip().rstrip("/")
    if not address:
        raise SubmitError("the Ray Jobs API address is empty; pass --address "
                          "http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


@contextlib.contextmanager
def _jobs_errors(address: str, token: AuthToken | None, job_id: str | None = None
                 ) -> Iterator[None]:
    """Turn the Jobs client's exceptions into `SubmitError` with a plain message."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except SubmitError:
        raise
    except AuthenticationError as exc:
        raise _auth_error(address, token, str(exc)) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as exc:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: {type(exc).__name__}. Check that "
            "the Ray head runs and that this is its dashboard address (default port 8265)."
        ) from None
    except requests.exceptions.RequestException as exc:
        raise SubmitError(f"request to the Ray Jobs API at {address} failed: {exc}") from None
    except RuntimeError as exc:
        text = str(exc)
        if "status code 401" in text or "status code 403" in text:
            raise _auth_error(address, token, text) from None
        if job_id and ("status code 404" in text or "does not exist" in text):
            raise SubmitError(f"job {job_id} not found at {address}") from None
        raise SubmitError(f"Ray Jobs API at {address}: {text}") from None


def _auth_error(address: str, token: AuthToken | None, detail: str) -> SubmitError:
    if token is None:
        return SubmitError(missing_token_message(address))
    rejected = "403" in detail or "invalid" in detail.lower() or "failed" in detail.lower()
    what = "rejected" if rejected else "not accepted"
    return SubmitError(
        f"The Ray cluster at {address} {what} the token from {token.source}. Replace it with "
        "the cluster's token (`ray get-auth-token` on the head node prints it)."
    )


def jobs_client(address: str) -> tuple[Any, str, AuthToken | None]:
    """Return a `JobSubmissionClient` for ``address``, its URL and the token it sends.

    Raises:
        SubmitError: the address cannot be reached or rejects the token.
    """
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    token = find_auth_token()
    with _jobs_errors(url, token):
        client = JobSubmissionClient(url, headers=auth_headers(token) or None)
    return client, url, token


def package_dirs() -> list[Path]:
    """Return the folders of the ``mmts_search`` and ``workers`` packages (not imported)."""
    folders = []
    for name in ("mmts_search", "workers"):
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise SubmitError(f"package {name} not found; install the project "
                              "(pip install -e .) before submitting")
        folders.append(Path(next(iter(found.submodule_search_locations))))
    return folders


def build_runtime_env(working_dir: Path) -> dict[str, Any]:
    """Return the job's runtime environment (see the module docstring)."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "py_modules": [str(folder) for folder in package_dirs()],
        "excludes": list(UPLOAD_EXCLUDES),
    }
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def submission_warnings(spec: Any) -> list[str]:
    """Return warnings about paths that would point into the job's temporary folder."""
    warnings = []
    if not spec.storage.startswith("s3://") and not Path(spec.storage).expanduser().is_absolute():
        warnings.append(
            f"storage {spec.storage!r} is relative: results go to the job's working folder "
            "on the head node, which Ray deletes later. Use an absolute path on shared "
            "storage or s3://bucket/prefix."
        )
    for dataset in spec.datasets:
        paths = [getattr(dataset, "path", None)]
        if getattr(dataset, "concepts", None) is not None:
            paths.append(dataset.concepts.path)
        for path in paths:
            if path and "://" not in path and not Path(path).expanduser().is_absolute():
                warnings.append(
                    f"dataset {dataset.name}: path {path!r} is relative, so the job looks "
                    "for it in its working folder, which contains only sweep.yaml. Use an "
                    "absolute path that the cluster can read, or s3://bucket/prefix."
                )
    uri = spec.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        warnings.append(
            f"tracking.uri {uri!r} is relative: the MLflow database lands in the job's "
            "working folder on the head node. Use an MLflow server (http://...) or an "
            "absolute sqlite:////path."
        )
    return warnings


def submit_sweep(spec: Any, *, address: str, verbose: bool = False) -> str:
    """Submit ``spec`` as a Ray job running ``mmts-search run``; return the job id.

    Args:
        spec: the validated sweep (its overrides already applied).
        address: Jobs API URL of the cluster, ``http://HEAD:8265``.
        verbose: pass ``--verbose`` to the job's ``mmts-search run``.

    Raises:
        SubmitError: the cluster cannot be reached, demands a token, or rejects the job.
    """
    from mmts_search.spec import dump_sweep

    client, url, token = jobs_client(address)
    for warning in submission_warnings(spec):
        logger.warning("sweep %s: %s", spec.name, warning)

    working_dir = Path(tempfile.mkdtemp(prefix="mmts-submit-"))
    try:
        (working_dir / "sweep.yaml").write_text(dump_sweep(spec), encoding="utf-8")
        entrypoint = "python -m mmts_search run sweep.yaml --address auto"
        if verbose:
            entrypoint += " --verbose"
        job_id = f"mmts-{spec.name}-{uuid.uuid4().hex[:8]}"
        runtime_env = build_runtime_env(working_dir)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with _jobs_errors(url, token):
                    job_id = client.submit_job(
                        entrypoint=entrypoint,
                        submission_id=job_id,
                        runtime_env=runtime_env,
                        metadata={"mmts.sweep": spec.name},
                    )
                break
            except SubmitError as exc:
                # A head that has just started responds with 500 "No available agent to
                # submit job" until its job agent is up.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                logger.info("sweep %s: the job agent at %s is not ready yet; retrying in "
                            "2 s", spec.name, url)
                time.sleep(2.0)
    finally:
        # The Jobs client has uploaded the folder as a package by now.
        shutil.rmtree(working_dir, ignore_errors=True)
    logger.info("sweep %s: submitted job %s to %s", spec.name, job_id, url)
    return job_id


def get_job_state(address: str, job_id: str) -> JobState:
    """Return the status of job ``job_id``.

    Raises:
        SubmitError: unreachable address, token problem, or unknown job.
    """
    client, url, token = jobs_client(address)
    with _jobs_errors(url, token, job_id):
        info = client.get_job_info(job_id)
    status = getattr(info.status, "value", str(info.status))
    return JobState(job_id, str(status), info.message or "", info.entrypoint or "")


def get_job_logs(address: str, job_id: str) -> str:
    """Return the logs of job ``job_id`` so far."""
    client, url, token = jobs_client(address)
    with _jobs_errors(url, token, job_id):
        return client.get_job_logs(job_id)


def follow_job_logs(address: str, job_id: str, sink: Callable[[str], None]) -> None:
    """Send the job's log text to ``sink`` as it arrives, until the job ends."""
    client, url, token = jobs_client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sink(lines)

    with _jobs_errors(url, token, job_id):
        # Fail fast on an unknown job: tail_job_logs would only report a closed socket.
        client.get_job_info(job_id)
        asyncio.run(tail())


def stop_job(address: str, job_id: str) -> bool:
    """Ask Ray to stop job ``job_id``; return False when it had already ended."""
    client, url, token = jobs_client(address)
    with _jobs_errors(url, token, job_id):
        return bool(client.stop_job(job_id))


def wait_for_job(address: str, job_id: str, *, timeout_s: float = 3600.0,
                 poll_s: float = 2.0) -> JobState:
    """Poll until job ``job_id`` ends; return its final state.

    Raises:
        SubmitError: the job did not end within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = get_job_state(address, job_id)
        if state.is_terminal:
            return state
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {state.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
