"""Child runs of trials: created and written from the worker process.

A trial's child run is found by its tags, never by MLflow's in-process active run: it
carries ``mlflow.parentRunId`` (the sweep's parent run) and ``mmts.trial_id``, so a
retried trial on another machine continues the same run. Every call goes through an
explicit ``MlflowClient(tracking_uri=...)`` built from the run context that the driver
passes, never from the worker's environment.

While the tracking server is unreachable, metrics, tags and artifacts stay in memory
(artifacts as local files) and are sent at the next call once the server is back. What
is still unsent when the trial finishes is written to ``unsent_metrics.jsonl`` in the
trial's local folder, for `import_unsent_metrics`.
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from mmts_search.tracking._secrets import (
    param_value,
    redact,
    sanitize_key,
    tag_value,
)
from mmts_search.tracking._store import (
    MAX_METRICS_PER_BATCH,
    ROLE_TRIAL,
    TAG_FAMILY,
    TAG_PARENT_RUN_ID,
    TAG_ROLE,
    TAG_RUN_NAME,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    call_with_retry,
    find_or_create_child,
    is_transient,
    log_params_once,
    log_tags,
)
from mmts_search.tracking.unsent import (
    ARTIFACT_REQUEST_TIMEOUT_S,
    UNSENT_METRICS_FILE,
    import_unsent_metrics,
)

logger = logging.getLogger(__name__)

RUN_CONTEXT_KEYS = ("tracking_uri", "experiment_id", "parent_run_id", "sweep_name")
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
MODEL_ARTIFACT_DIR = "model"

# Seconds between reconnection attempts after consecutive failures: 5, 10, 20, 40, 60.
_FIRST_RECONNECT_DELAY_S = 5.0
_MAX_RECONNECT_DELAY_S = 60.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_float(value: Any) -> float | None:
    """Return ``value`` as a float when it is a number (also numpy or torch scalars)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            result = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return float(result) if isinstance(result, numbers.Real) else None
    return None


class TrialRun:
    """The MLflow child run of one trial, written from the worker.

    Made by `open_trial_run`. Without a run context it is local-only: artifacts are
    written to ``local_dir/artifacts`` and metrics and tags are dropped. Use it as a
    context manager to end the run as FAILED when training raises.

    Attributes:
        trial_id: the Tune trial id (or ``"local"``).
        local_dir: folder for staged artifacts and ``unsent_metrics.jsonl``.
    """

    def __init__(
        self,
        *,
        trial_id: str,
        local_dir: Path,
        run_context: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        call_budget_s: float = 4.0,
        finish_budget_s: float = 30.0,
        request_timeout_s: float = 3.0,
        max_buffered_metrics: int = 100_000,
    ) -> None:
        self.trial_id = trial_id
        self.local_dir = Path(local_dir)
        self._context = dict(run_context) if run_context is not None else None
        self._client = (MlflowClient(tracking_uri=self._context["tracking_uri"])
                        if self._context is not None else None)
        self._params = dict(params or {})
        self._run_id: str | None = None
        self._call_budget_s = call_budget_s
        self._finish_budget_s = finish_budget_s
        self._request_timeout_s = request_timeout_s
        self._max_buffered_metrics = max_buffered_metrics

        self._pending_metrics: list[Metric] = []
        self._pending_tags: dict[str, str] = {}
        self._pending_artifacts: list[tuple[Path, str | None, bool]] = []
        self._failures = 0
        self._next_attempt_at = 0.0
        self._finished = False

    # ------------------------------------------------------------------ properties

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None when local-only or not created yet (server down)."""
        return self._run_id

    @property
    def tracked(self) -> bool:
        """True when the trial logs to MLflow (a run context was given)."""
        return self._context is not None

    @property
    def unsent_metrics_path(self) -> Path:
        """Where unsent metrics, tags, artifacts and the final status are saved."""
        return self.local_dir / UNSENT_METRICS_FILE

    @property
    def artifact_dir(self) -> Path:
        """Folder where artifacts are staged before upload (and kept when local-only)."""
        return self.local_dir / "artifacts"

    # ------------------------------------------------------------------ public API

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one report: numbers become metrics at ``step``, other values become tags.

        Metric keys keep ``/`` (``digits/rsum``); characters that MLflow rejects become
        ``_``. Strings such as ``error`` are set as tags (redacted); None is skipped.
        The call sends at once when the server is reachable. Otherwise it returns after
        at most a few seconds and keeps the values in memory until the server is back.

        Args:
            metrics: metric name to value (floats, ints, bools, numpy or torch scalars).
            step: the epoch (MLflow plots learning curves over it).
        """
        if self._context is None:
            return
        timestamp = _now_ms()
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                self._pending_metrics.append(Metric(sanitize_key(key), number, timestamp,
                                                    int(step)))
            elif value is not None:
                self._pending_tags[sanitize_key(key)] = tag_value(value)

        if len(self._pending_metrics) > self._max_buffered_metrics:
            self._spill(reason=f"more than {self._max_buffered_metrics} metrics are unsent")
        self._sync(self._call_budget_s)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run (values redacted); kept for later when the server is down."""
        if self._context is None:
            return
        for key, value in tags.items():
            self._pending_tags[sanitize_key(key)] = tag_value(value)
        self._sync(self._call_budget_s)

    def log_figure(self, figure: Any, artifact_file: str) -> Path:
        """Save a matplotlib (or plotly, for ``.html``) figure and log it as an artifact.

        Args:
            figure: a ``matplotlib.figure.Figure``, or a plotly figure with ``.html``.
            artifact_file: path inside the run's artifacts, for example
                ``"schedule.png"``.

        Returns:
            The local copy of the file.
        """
        path = self._stage(artifact_file)
        if artifact_file.endswith(".html") and hasattr(figure, "write_html"):
            figure.write_html(str(path), include_plotlyjs="cdn")
        else:
            figure.savefig(path, dpi=120, bbox_inches="tight")
        self._add_artifact(path, artifact_file, keep_local=True)
        return path

    def log_dict(self, obj: Any, artifact_file: str) -> Path:
        """Log ``obj`` as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact.

        The text is redacted before it is written.

        Returns:
            The local copy of the file.
        """
        path = self._stage(artifact_file)
        path.write_text(redact(serialize(obj, artifact_file)), encoding="utf-8")
        self._add_artifact(path, artifact_file, keep_local=True)
        return path

    def log_state_dict(
        self,
        state_dict: Mapping[str, Any],
        artifact_file: str = "model.safetensors",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Log model weights as safetensors under the run's ``model/`` artifact folder.

        The folder ``model/`` is what `SweepRun.register_best_model` registers. Tensors are
        copied to the CPU first; ``metadata`` (strings) is stored in the safetensors header.
        The local copy is deleted after a successful upload.

        Args:
            state_dict: parameter name to tensor, for example ``model.state_dict()``.
            artifact_file: file name inside ``model/``.
            metadata: optional string metadata (model spec, trial id, ...).

        Returns:
            The artifact path, ``"model/<artifact_file>"``.
        """
        from safetensors.torch import save_file

        artifact_path = f"{MODEL_ARTIFACT_DIR}/{artifact_file}"
        path = self._stage(artifact_path)
        # Cloned, contiguous CPU tensors: safetensors rejects tensors that share memory.
        tensors = {key: value.detach().to("cpu").clone().contiguous()
                   for key, value in state_dict.items()}
        header = {str(key): redact(str(value)) for key, value in (metadata or {}).items()}
        save_file(tensors, str(path), metadata=header or None)
        self._add_artifact(path, artifact_path, keep_local=self._context is None)
        return artifact_path

    def finish(self, status: str = "FINISHED", tags: Mapping[str, Any] | None = None) -> None:
        """End the run with ``status`` after sending everything that is still unsent.

        Waits up to ``finish_budget_s`` seconds for an unreachable server. What cannot be
        sent then is saved to ``unsent_metrics.jsonl`` with the final status, and a
        warning explains how to import it. A second call does nothing.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            tags: tags to set before ending, for example ``{"error": "..."}``.

        Raises:
            ValueError: for another status.
        """
        status = status.upper()
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES} but got {status!r}")
        if self._finished:
            logger.debug("trial %s: finish(%s) called again; ignored", self.trial_id, status)
            return
        self._finished = True
        if self._context is None:
            return

        for key, value in (tags or {}).items():
            self._pending_tags[sanitize_key(key)] = tag_value(value)

        sent = self._sync(self._finish_budget_s, force=True)
        if sent and self.unsent_metrics_path.exists():
            # Records an earlier attempt of this trial (or this one) had to save locally.
            try:
                import_unsent_metrics(self.unsent_metrics_path, self._context["tracking_uri"],
                                      budget_s=self._finish_budget_s)
            except Exception as error:  # noqa: BLE001 - the file stays for a manual import
                logger.warning("trial %s: importing %s failed, it is kept for a manual "
                               "import: %s", self.trial_id, self.unsent_metrics_path,
                               redact(error))
        if sent:
            try:
                call_with_retry(
                    lambda: self._terminate(status),
                    budget_s=self._finish_budget_s, request_timeout_s=self._request_timeout_s,
                    description=f"ending run {self._run_id}",
                )
            except Exception as error:  # noqa: BLE001 - saved for a later import instead
                logger.warning("trial %s: ending run %s failed: %s", self.trial_id,
                               self._run_id, redact(error))
                sent = False
        if not sent:
            self._spill(reason="the tracking server is unreachable", status=status)
            return
        logger.info("trial %s: MLflow run %s ended %s", self.trial_id, self._run_id, status)

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        if self._finished:
            return
        if exc is None:
            self.finish("FINISHED")
        elif isinstance(exc, Exception):
            self.finish("FAILED", {"error": f"{exc_type.__name__}: {exc}"})
        else:
            # KeyboardInterrupt, SystemExit or a stop request of the trial runner.
            self.finish("KILLED", {"error": f"interrupted ({exc_type.__name__})"})

    # ------------------------------------------------------------------ internals

    def open(self, budget_s: float) -> None:
        """Find or create the child run; when the server is down, retry at later calls."""
        if self._context is None:
            return
        self._sync(budget_s, force=True)
        if self._run_id is None:
            logger.warning(
                "trial %s: could not create its MLflow run at %s; training goes on and the "
                "run is created when the server is back", self.trial_id,
                redact(self._context["tracking_uri"]))

    def _terminate(self, status: str) -> None:
        assert self._client is not None and self._run_id is not None
        current = self._client.get_run(self._run_id).info.status
        if current != "RUNNING":
            # The driver ended the run first, for example the Tune callback marks a pruned
            # trial KILLED while its worker stops. The driver's status wins.
            logger.info("trial %s: run %s was already ended as %s; keeping that status",
                        self.trial_id, self._run_id, current)
            return
        self._client.set_terminated(self._run_id, status)

    def _stage(self, artifact_file: str) -> Path:
        relative = Path(artifact_file)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"artifact_file must be a relative path inside the run but got "
                             f"{artifact_file!r}")
        path = self.artifact_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _add_artifact(self, path: Path, artifact_file: str, *, keep_local: bool) -> None:
        if self._context is None:
            return
        folder = str(Path(artifact_file).parent)
        self._pending_artifacts.append((path, None if folder == "." else folder, keep_local))
        self._sync(self._call_budget_s)

    def _creation_tags(self) -> dict[str, str]:
        assert self._context is not None
        family = self._params.get("family")
        tags = {
            TAG_PARENT_RUN_ID: self._context["parent_run_id"],
            TAG_TRIAL_ID: self.trial_id,
            TAG_SWEEP: tag_value(self._context.get("sweep_name", "")),
            TAG_ROLE: ROLE_TRIAL,
        }
        if family:
            tags[TAG_FAMILY] = family
        return tags

    def _run_name(self) -> str:
        family = self._params.get("family")
        return f"{family}-{self.trial_id}" if family else self.trial_id

    def _ensure_run(self) -> str:
        assert self._context is not None and self._client is not None
        if self._run_id is None:
            run_id, reused = find_or_create_child(
                self._client,
                experiment_id=self._context["experiment_id"],
                parent_run_id=self._context["parent_run_id"],
                trial_id=self.trial_id,
                tags={**self._creation_tags(), TAG_RUN_NAME: self._run_name()},
                run_name=self._run_name(),
            )
            log_params_once(self._client, run_id, self._params)
            self._run_id = run_id
            logger.info("trial %s: %s MLflow run %s under parent %s", self.trial_id,
                        "continuing" if reused else "created", run_id,
                        self._context["parent_run_id"])
        return self._run_id

    def _send_pending(self) -> None:
        assert self._client is not None
        run_id = self._ensure_run()
        if self._pending_tags:
            log_tags(self._client, run_id, self._pending_tags)
            self._pending_tags = {}
        while self._pending_metrics:
            batch = self._pending_metrics[:MAX_METRICS_PER_BATCH]
            self._client.log_batch(run_id, metrics=batch)
            del self._pending_metrics[:len(batch)]

    def _send_artifacts(self) -> None:
        # NOTE: uploads straight to S3 (a server without artifact proxying) go through
        # boto3, whose own retries and timeouts this module does not bound.
        assert self._client is not None
        while self._pending_artifacts:
            path, folder, keep_local = self._pending_artifacts[0]
            if path.exists():
                self._client.log_artifact(self._run_id, str(path), artifact_path=folder)
                if not keep_local:
                    path.unlink(missing_ok=True)
            else:
                logger.warning("trial %s: staged artifact %s disappeared before upload",
                               self.trial_id, path)
            self._pending_artifacts.pop(0)

    def _sync(self, budget_s: float, *, force: bool = False) -> bool:
        """Send what is pending; return True when nothing is left to send."""
        if self._context is None:
            return True
        if not force and time.monotonic() < self._next_attempt_at:
            return False

        try:
            call_with_retry(self._send_pending, budget_s=budget_s,
                            request_timeout_s=self._request_timeout_s,
                            description=f"sending metrics of trial {self.trial_id}")
            if self._pending_artifacts:
                call_with_retry(self._send_artifacts, budget_s=budget_s,
                                request_timeout_s=ARTIFACT_REQUEST_TIMEOUT_S,
                                description=f"uploading artifacts of trial {self.trial_id}")
        except Exception as error:  # noqa: BLE001 - training must go on without tracking
            if not is_transient(error):
                logger.error("trial %s: MLflow rejected the logged data (%s); saving it to %s",
                             self.trial_id, redact(error), self.unsent_metrics_path)
                self._spill(reason=f"MLflow rejected it: {redact(error)}")
                # Later data may be fine, but a rejected run (deleted, say) rejects it
                # all: wait before the next attempt instead of failing at every call.
                self._next_attempt_at = time.monotonic() + _FIRST_RECONNECT_DELAY_S
                return False
            self._failures += 1
            delay = min(_FIRST_RECONNECT_DELAY_S * 2 ** (self._failures - 1),
                        _MAX_RECONNECT_DELAY_S)
            self._next_attempt_at = time.monotonic() + delay
            log = logger.warning if self._failures == 1 else logger.debug
            log("trial %s: MLflow at %s is unreachable (%s); keeping %d metrics in memory, "
                "next attempt in %.0f s", self.trial_id, redact(self._context["tracking_uri"]),
                redact(error), len(self._pending_metrics), delay)
            return False

        if self._failures:
            logger.info("trial %s: MLflow at %s is reachable again; unsent data was sent",
                        self.trial_id, redact(self._context["tracking_uri"]))
        self._failures = 0
        self._next_attempt_at = 0.0
        return True

    def _identity(self) -> dict[str, str | None]:
        assert self._context is not None
        return {
            "experiment_id": self._context["experiment_id"],
            "parent_run_id": self._context["parent_run_id"],
            "trial_id": self.trial_id,
            "run_id": self._run_id,
        }

    def _spill(self, *, reason: str, status: str | None = None) -> None:
        """Append every pending item (and the final status) to ``unsent_metrics.jsonl``."""
        assert self._context is not None
        identity = self._identity()
        records: list[dict[str, Any]] = [{
            "kind": "trial",
            **identity,
            "tracking_uri": redact(self._context["tracking_uri"]),
            "sweep_name": self._context.get("sweep_name", ""),
            "params": self._params,
            "tags": {**self._creation_tags(), TAG_RUN_NAME: self._run_name()},
            "run_name": self._run_name(),
        }]
        records += [
            {"kind": "metric", **identity, "key": metric.key, "value": metric.value,
             "step": metric.step, "timestamp": metric.timestamp}
            for metric in self._pending_metrics
        ]
        if self._pending_tags:
            records.append({"kind": "tags", **identity, "tags": self._pending_tags})
        records += [
            {"kind": "artifact", **identity, "local_path": str(path.resolve()),
             "artifact_path": folder}
            for path, folder, _ in self._pending_artifacts
        ]
        if status is not None:
            records.append({"kind": "status", **identity, "status": status,
                            "end_time": _now_ms()})

        metric_count = len(self._pending_metrics)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record) + "\n" for record in records)
        with self.unsent_metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(text)
        self._pending_metrics = []
        self._pending_tags = {}
        self._pending_artifacts = []
        logger.warning(
            "trial %s: %d metrics%s of MLflow run %s were saved to %s because %s. Import "
            "them when the server is back with `mmts-search import-metrics %s` (or "
            "mmts_search.tracking.import_unsent_metrics(path, uri))",
            self.trial_id, metric_count, " and the final status" if status else "",
            self._run_id or "(not created yet)", self.unsent_metrics_path, reason,
            self.unsent_metrics_path,
        )


def serialize(obj: Any, artifact_file: str) -> str:
    """Return ``obj`` as JSON, or as YAML when ``artifact_file`` ends in .yaml or .yml."""
    if artifact_file.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_dump(_plain(obj), sort_keys=False)
    return json.dumps(_plain(obj), indent=2, default=str)


def _plain(obj: Any) -> Any:
    """Convert numpy and torch scalars and arrays to Python values for JSON and YAML."""
    if isinstance(obj, Mapping):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return obj


def open_trial_run(
    run_context: Mapping[str, str] | None,
    *,
    trial_id: str,
    params: Mapping[str, Any],
    local_dir: Path | str,
    call_budget_s: float = 4.0,
    open_budget_s: float = 10.0,
    finish_budget_s: float = 30.0,
) -> TrialRun:
    """Open the child run of a trial, or continue it when the trial is retried.

    Logs ``params`` (the schedule family, its values and ``optuna_trial_number``) plus
    ``trial_id`` once. On a retry, params already logged with the same value are skipped
    and a changed value is kept as a ``mmts.param_conflict.<key>`` tag. When the server
    cannot be reached within ``open_budget_s`` seconds, training goes on and the run is
    created at a later call.

    Args:
        run_context: ``{"tracking_uri", "experiment_id", "parent_run_id", "sweep_name"}``
            from `SweepRun.run_context`, or None for a local-only run.
        trial_id: the Tune trial id; it tags the run (``mmts.trial_id``).
        params: the flat trial config, for example ``{"family": "mmts", "alpha": 0.1}``.
        local_dir: the trial's folder for staged artifacts and unsent metrics.
        call_budget_s: seconds one logging call may spend retrying an unreachable server.
        open_budget_s: seconds this call may spend creating the run.
        finish_budget_s: seconds `TrialRun.finish` may wait for the server.

    Returns:
        The trial run.

    Raises:
        ValueError: when ``run_context`` lacks a key.
    """
    if run_context is not None:
        missing = [key for key in RUN_CONTEXT_KEYS if not run_context.get(key)
                   and key != "sweep_name"]
        if missing:
            raise ValueError(f"run_context lacks {missing}; build it with SweepRun.run_context")

    logged = {sanitize_key(key): param_value(value) for key, value in params.items()}
    logged["trial_id"] = param_value(trial_id)
    run = TrialRun(trial_id=trial_id, local_dir=Path(local_dir), run_context=run_context,
                   params=logged, call_budget_s=call_budget_s, finish_budget_s=finish_budget_s)
    run.local_dir.mkdir(parents=True, exist_ok=True)
    run.open(open_budget_s)
    return run
