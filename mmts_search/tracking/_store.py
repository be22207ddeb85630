"""Tracking URIs, bounded retries around MLflow calls, and the preflight check."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException, RestException

from mmts_search.tracking._secrets import (
    MAX_TAG_VALUE_LENGTH,
    redact,
    sanitize_key,
    truncate,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Tags that identify sweep and trial runs.
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_ROLE = "mmts.role"
TAG_SWEEP = "mmts.sweep"
TAG_TRIAL_ID = "mmts.trial_id"
TAG_FAMILY = "mmts.family"
TAG_ATTEMPTS = "mmts.attempts"
TAG_OBJECTIVE_METRIC = "mmts.objective_metric"
TAG_OBJECTIVE_MODE = "mmts.objective_mode"
TAG_PRUNED = "pruned"
TAG_PRUNED_EPOCH = "pruned_epoch"
TAG_ERROR = "error"
TAG_INTERRUPTED = "mmts.interrupted"
TAG_PARAM_CONFLICT_PREFIX = "mmts.param_conflict."
ROLE_PARENT = "parent"
ROLE_TRIAL = "trial"

MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# RestException codes that retrying cannot fix.
_PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED",
    "NOT_IMPLEMENTED",
})

_HTTP_ENV_LOCK = threading.Lock()
_http_env_users = 0
_http_env_saved: dict[str, str | None] = {}
_HTTP_ENV_NAMES = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


class TrackingUnavailableError(RuntimeError):
    """The tracking server, its database or its artifact store cannot be used.

    Attributes:
        uri: the tracking URI with credentials masked.
        reason: what failed.
    """

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = redact(uri)
        self.reason = redact(reason)
        super().__init__(
            f"MLflow tracking at {self.uri} is unavailable: {self.reason}. Check that the "
            "server (or database) is running and reachable, or change tracking.uri in the "
            "sweep file."
        )


# --------------------------------------------------------------------------- URIs


def resolve_tracking_uri(uri: str | None, base_dir: Path | str) -> str:
    """Return ``uri`` with a relative local path made absolute against ``base_dir``.

    Workers run in other working directories than the driver, so ``sqlite:///mlflow.db``
    must reach them as ``sqlite:////abs/base_dir/mlflow.db``. Plain paths and ``file:``
    URIs become absolute ``file://`` URIs. Remote URIs (``http(s)://``, ``postgresql://``,
    ``databricks``, ...) and absolute ones are returned unchanged.

    Args:
        uri: the tracking URI of the sweep file; None or empty means the default
            ``sqlite:///mlflow.db``.
        base_dir: the directory relative paths are resolved against (the driver's
            working directory).

    Returns:
        The absolute tracking URI.
    """
    uri = (uri or DEFAULT_TRACKING_URI).strip()
    base = Path(base_dir).expanduser().resolve()

    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            return uri
        rest = uri[len("sqlite:///"):]
        path_part, separator, query = rest.partition("?")
        if not path_part or path_part.startswith("/") or path_part == ":memory:":
            return uri
        absolute = (base / path_part).resolve()
        return f"sqlite:///{absolute}{separator}{query}"

    if uri.startswith("file:"):
        path_part = urlsplit(uri).path if uri.startswith("file://") else uri[len("file:"):]
        if Path(path_part).is_absolute():
            return uri
        return (base / path_part).resolve().as_uri()

    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        # A plain folder path: MLflow's file store.
        return (base / uri).expanduser().resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """Return the database file of an absolute ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path_part = uri[len("sqlite:///"):].partition("?")[0]
    if not path_part or path_part == ":memory:":
        return None
    return Path(path_part)


def is_http_uri(uri: str) -> bool:
    """Return True for an ``http://`` or ``https://`` tracking URI."""
    return uri.startswith(("http://", "https://"))


# --------------------------------------------------------------------------- retries


def is_transient(error: BaseException) -> bool:
    """Return True when retrying the MLflow call that raised ``error`` may succeed."""
    if isinstance(error, RestException):
        return error.error_code not in _PERMANENT_ERROR_CODES
    if isinstance(error, MlflowException):
        # Connection failures and timeouts of the REST client arrive as plain
        # MlflowException with INTERNAL_ERROR or TEMPORARILY_UNAVAILABLE.
        return error.error_code not in _PERMANENT_ERROR_CODES
    if isinstance(error, (OSError, TimeoutError)):
        return True
    module = type(error).__module__
    # requests, urllib3, botocore and sqlalchemy errors ("database is locked").
    return module.startswith(("requests", "urllib3", "botocore", "boto3", "sqlalchemy"))


@contextlib.contextmanager
def bounded_http(timeout_s: float) -> Iterator[None]:
    """Make MLflow's REST client give up after one attempt of at most ``timeout_s``.

    By default MLflow 3.17 retries a failed request 7 times with a backoff factor of 2
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), which blocks a caller for minutes while a
    server is down. MLflow reads its retry settings
    from environment variables at each request, so they are set while at least one block
    is open in the process and restored when the last one closes. Nested or concurrent
    blocks share the timeout of the block that opened first.
    """
    global _http_env_users, _http_env_saved
    with _HTTP_ENV_LOCK:
        if _http_env_users == 0:
            _http_env_saved = {name: os.environ.get(name) for name in _HTTP_ENV_NAMES}
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        _http_env_users += 1
    try:
        yield
    finally:
        with _HTTP_ENV_LOCK:
            _http_env_users -= 1
            if _http_env_users == 0:
                for name, value in _http_env_saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def call_with_retry(
    call: Callable[[], T],
    *,
    budget_s: float,
    request_timeout_s: float = 3.0,
    description: str = "MLflow call",
) -> T:
    """Run ``call`` until it succeeds, retrying transient errors for ``budget_s`` seconds.

    Waits 0.25 s, 0.5 s, 1 s, ... (at most 2 s) between attempts. One attempt waits at
    most ``request_timeout_s`` for the server, so the call returns or raises within about
    ``budget_s + request_timeout_s`` seconds.

    Raises:
        The last error, at once when it is not transient (see `is_transient`).
    """
    deadline = time.monotonic() + budget_s
    delay = 0.25
    attempt = 0
    while True:
        attempt += 1
        try:
            with bounded_http(request_timeout_s):
                return call()
        except Exception as error:
            remaining = deadline - time.monotonic()
            if not is_transient(error) or remaining <= 0:
                raise
            logger.debug("%s failed (attempt %d), retrying in %.2f s: %s",
                         description, attempt, min(delay, remaining), redact(error))
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)


# --------------------------------------------------------------------------- runs


def quote_filter_value(value: str) -> str:
    """Return ``value`` as a quoted string literal of an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_all_runs(
    client: MlflowClient,
    experiment_ids: list[str],
    filter_string: str,
    *,
    order_by: list[str] | None = None,
    view: int = ViewType.ACTIVE_ONLY,
) -> list[Run]:
    """Return every run matching ``filter_string``, following result pages."""
    runs: list[Run] = []
    page_token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, run_view_type=view, max_results=1000,
            order_by=order_by, page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def child_runs(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    *,
    trial_id: str | None = None,
    status: str | None = None,
) -> list[Run]:
    """Return the child runs of ``parent_run_id``, oldest first.

    Args:
        trial_id: only the runs tagged ``mmts.trial_id = trial_id``.
        status: only runs in this MLflow status (``RUNNING``, ...).
    """
    clauses = [f"tags.`{TAG_PARENT_RUN_ID}` = {quote_filter_value(parent_run_id)}"]
    if trial_id is not None:
        clauses.append(f"tags.`{TAG_TRIAL_ID}` = {quote_filter_value(trial_id)}")
    if status is not None:
        clauses.append(f"attributes.status = {quote_filter_value(status)}")
    return search_all_runs(
        client, [experiment_id], " and ".join(clauses),
        order_by=["attributes.start_time ASC"],
    )


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a run in batches of 100 (values must already be redacted)."""
    items = [RunTag(sanitize_key(key), truncate(str(value), MAX_TAG_VALUE_LENGTH))
             for key, value in tags.items()]
    for start in range(0, len(items), MAX_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[start:start + MAX_TAGS_PER_BATCH])


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
    """Log ``params`` on a run, skipping those already there with the same value.

    MLflow rejects changing a logged param. A param that is already logged with another
    value (a resumed sweep with an override, two processes racing on one run) is not
    sent, and is set as the tag ``mmts.param_conflict.<key>`` holding the new value.

    Args:
        params: key to value, both already sanitized and redacted.

    Returns:
        The conflicting params, key to the value that was not logged.
    """
    conflicts: dict[str, str] = {}
    for _ in range(2):
        existing = client.get_run(run_id).data.params
        missing = [Param(key, value) for key, value in params.items() if key not in existing]
        conflicts = {
            key: value for key, value in params.items()
            if key in existing and existing[key] != value
        }
        try:
            for start in range(0, len(missing), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=missing[start:start + MAX_PARAMS_PER_BATCH])
            break
        except RestException as error:
            # Another process logged some of these params between the read and the write.
            if error.error_code != "INVALID_PARAMETER_VALUE":
                raise
    else:
        raise MlflowException(f"could not log params of run {run_id} after re-reading them")

    if conflicts:
        logger.warning(
            "run %s already has params %s with other values; the new values are kept as "
            "tags %s<key>", run_id, sorted(conflicts), TAG_PARAM_CONFLICT_PREFIX,
        )
        log_tags(client, run_id, {TAG_PARAM_CONFLICT_PREFIX + key: value
                                   for key, value in conflicts.items()})
    return conflicts


def find_or_create_child(
    client: MlflowClient,
    *,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    tags: Mapping[str, str],
    run_name: str,
) -> tuple[str, bool]:
    """Return the child run of a trial, creating it when the trial has none yet.

    A reused run (retried trial) is set back to RUNNING and its ``mmts.attempts`` tag is
    incremented. When two processes create a run for the same trial at the same moment,
    both keep the oldest run and the newer one is deleted.

    Returns:
        ``(run_id, reused)``.
    """
    existing = _sorted_runs(child_runs(client, experiment_id, parent_run_id, trial_id=trial_id))
    if existing:
        run = existing[0]
        if len(existing) > 1:
            logger.warning("trial %s has %d child runs under parent %s; using the oldest, %s",
                           trial_id, len(existing), parent_run_id, run.info.run_id)
        attempts = int(run.data.tags.get(TAG_ATTEMPTS, "1") or 1) + 1
        client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        log_tags(client, run.info.run_id, {TAG_ATTEMPTS: str(attempts)})
        return run.info.run_id, True

    created = client.create_run(experiment_id, tags={**tags, TAG_ATTEMPTS: "1"},
                                run_name=run_name)
    run_id = created.info.run_id
    again = _sorted_runs(child_runs(client, experiment_id, parent_run_id, trial_id=trial_id))
    if again and again[0].info.run_id != run_id:
        client.delete_run(run_id)
        logger.info("trial %s: another process created its run first; using %s",
                    trial_id, again[0].info.run_id)
        return again[0].info.run_id, True
    return run_id, False


def _sorted_runs(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: (run.info.start_time or 0, run.info.run_id))


# --------------------------------------------------------------------------- preflight


def _auth_headers() -> dict[str, str]:
    # The same credential variables the MLflow client reads; values never leave the
    # request.
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {}


def _basic_auth() -> tuple[str, str] | None:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def _run_with_timeout(call: Callable[[], T], timeout_s: float, label: str) -> T:
    """Run ``call`` in a daemon thread; raise TimeoutError after ``timeout_s`` seconds."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"preflight-{label}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{label} did not return within {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _check_http_server(uri: str, timeout_s: float) -> None:
    import requests

    base = uri.rstrip("/")
    try:
        response = requests.get(f"{base}/health", timeout=timeout_s, headers=_auth_headers(),
                                auth=_basic_auth())
    except requests.RequestException as error:
        raise TrackingUnavailableError(uri, f"GET /health failed: {error}") from None
    if response.status_code != 200:
        raise TrackingUnavailableError(
            uri, f"GET /health returned HTTP {response.status_code}: {response.text[:200]}")


def _check_proxied_artifacts(uri: str, timeout_s: float) -> None:
    """List the root of the server's artifact proxy (``--artifacts-destination``)."""
    import requests

    url = f"{uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts"
    try:
        # The server was reachable a moment ago, so only the read gets a long timeout:
        # its first artifact request creates the S3 client, which can take several seconds.
        response = requests.get(url, timeout=(timeout_s, max(timeout_s, 30.0)),
                                headers=_auth_headers(), auth=_basic_auth())
    except requests.RequestException as error:
        raise TrackingUnavailableError(uri, f"artifact listing failed: {error}") from None
    if response.status_code == 200:
        return

    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error_code" not in body:
        # No JSON error: the server does not proxy artifacts (--no-serve-artifacts) or a
        # proxy in front of it responded. The experiment's artifact location is checked
        # instead.
        logger.debug("artifact proxy of %s returned HTTP %d; skipping the proxy check",
                     redact(uri), response.status_code)
        return
    if body["error_code"] in {"ENDPOINT_NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"}:
        logger.debug("artifact proxy of %s not usable for the preflight: %s",
                     redact(uri), body["error_code"])
        return
    raise TrackingUnavailableError(
        uri, f"the server's artifact store is unavailable: {body.get('message', body)}")


def _check_s3_bucket(uri: str, location: str, timeout_s: float) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urlsplit(location).netloc
    client = boto3.client(
        "s3",
        endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
        config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                      retries={"max_attempts": 1}),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in {"404", "NoSuchBucket", "NotFound"}:
            reason = f"artifact bucket {bucket!r} ({redact(location)}) does not exist"
        elif code in {"403", "AccessDenied", "Forbidden"}:
            reason = f"access to artifact bucket {bucket!r} was denied (check AWS credentials)"
        else:
            reason = f"artifact bucket {bucket!r} check failed: {error}"
        raise TrackingUnavailableError(uri, reason) from None
    except BotoCoreError as error:
        raise TrackingUnavailableError(
            uri, f"S3 endpoint for artifact bucket {bucket!r} is unreachable: {error}") from None


def _check_local_dir(uri: str, location: str) -> None:
    path = Path(urlsplit(location).path if location.startswith("file:") else location)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise TrackingUnavailableError(
            uri, f"artifact folder {path} cannot be created or written ({existing} is "
                 "not writable)")


def check_artifact_location(uri: str, location: str, *, timeout_s: float = 5.0) -> None:
    """Check that an experiment's artifact location can be reached.

    ``s3://`` locations get a ``head_bucket`` through boto3 (endpoint from
    ``MLFLOW_S3_ENDPOINT_URL``), local paths a write-permission check. Proxied
    ``mlflow-artifacts:`` locations are checked through the server by `preflight`, and
    other schemes are not checked.

    Raises:
        TrackingUnavailableError: naming the URI and the reason.
    """
    if location.startswith("s3://"):
        _check_s3_bucket(uri, location, timeout_s)
    elif location.startswith("file:") or location.startswith("/"):
        _check_local_dir(uri, location)


def preflight(uri: str, *, experiment: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail fast when the tracking store or its artifact store cannot be used.

    For an HTTP server: ``GET /health`` with a ``timeout_s`` timeout, a real
    ``search_experiments(max_results=1)``, and a listing of the root of the server's
    artifact proxy, which fails when the ``--artifacts-destination`` bucket is missing.
    For a database URI (``sqlite:///``, ``postgresql://``, ...): a real
    ``search_experiments`` with a ``timeout_s`` limit, and for SQLite a check that the
    database folder is writable. When ``experiment`` exists, its artifact location is
    checked too (``head_bucket`` for ``s3://``, write access for local folders).

    Args:
        uri: an absolute tracking URI (see `resolve_tracking_uri`).
        experiment: the experiment name of the sweep, or None.
        timeout_s: the time limit of each network check, in seconds.

    Raises:
        TrackingUnavailableError: with the URI (credentials masked) and the reason.
    """
    started = time.monotonic()
    if is_http_uri(uri):
        _check_http_server(uri, timeout_s)
    db_path = sqlite_path(uri)
    if db_path is not None:
        folder = db_path.parent
        if not folder.is_dir():
            raise TrackingUnavailableError(uri, f"database folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise TrackingUnavailableError(uri, f"database folder {folder} is not writable")

    client = MlflowClient(tracking_uri=uri)
    # A first request may be slow (a new SQLite database runs MLflow's schema
    # migrations), while an unreachable HTTP server has already failed the health check.
    query_timeout_s = 120.0 if db_path is not None else timeout_s * 3
    try:
        _run_with_timeout(
            lambda: call_with_retry(
                lambda: client.search_experiments(max_results=1),
                budget_s=0, request_timeout_s=query_timeout_s,
                description="search_experiments",
            ),
            query_timeout_s + 1,
            "search_experiments",
        )
    except Exception as error:  # noqa: BLE001 - any failure means the store is unusable
        raise TrackingUnavailableError(uri, f"search_experiments failed: {error}") from None

    if is_http_uri(uri):
        _check_proxied_artifacts(uri, timeout_s)

    if experiment:
        try:
            found = call_with_retry(lambda: client.get_experiment_by_name(experiment),
                                    budget_s=0, request_timeout_s=query_timeout_s)
        except Exception as error:  # noqa: BLE001
            raise TrackingUnavailableError(
                uri, f"reading experiment {experiment!r} failed: {error}") from None
        if found is not None and found.artifact_location:
            check_artifact_location(uri, found.artifact_location, timeout_s=timeout_s)

    logger.info("MLflow tracking at %s is reachable (checked in %.1f s)", redact(uri),
                time.monotonic() - started)
