"""Import of the metrics, tags, artifacts and final status that a trial saved locally.

A trial writes ``unsent_metrics.jsonl`` when the tracking server stays unreachable until
the trial ends. Each line is one JSON record with ``kind`` ``trial`` (run identity,
params and creation tags), ``metric``, ``tags``, ``artifact`` (a local file) or
``status``, and every record names its ``experiment_id``, ``parent_run_id``,
``trial_id`` and ``run_id`` (None when the run was never created).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from mmts_search.tracking._secrets import MASK, redact
from mmts_search.tracking._store import (
    MAX_METRICS_PER_BATCH,
    call_with_retry,
    find_or_create_child,
    log_params_once,
    log_tags,
)

logger = logging.getLogger(__name__)

UNSENT_METRICS_FILE = "unsent_metrics.jsonl"
# Artifact uploads send whole files, so one request may take longer than a metric batch.
ARTIFACT_REQUEST_TIMEOUT_S = 60.0


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            logger.warning("%s line %d is not valid JSON and is skipped: %s", path, number, error)
    return records


def import_unsent_metrics(
    path: Path | str,
    uri: str | None = None,
    *,
    budget_s: float = 30.0,
    rename: bool = True,
) -> int:
    """Send the metrics, tags, artifacts and final status saved in an unsent-metrics file.

    Runs that do not exist yet are created under their parent (found by trial id), so a
    trial whose server was down for its whole life is still imported. Importing twice is
    harmless: MLflow skips metric points identical to logged ones.

    Args:
        path: the ``unsent_metrics.jsonl`` file of a trial.
        uri: the tracking URI. Default: the URI saved in the file, which is only usable
            when it contains no credentials (they are masked when saved).
        budget_s: seconds each run's import may retry an unreachable server.
        rename: rename the file to ``*.imported-<time>.jsonl`` after a full import.

    Returns:
        The number of metric points sent.

    Raises:
        ValueError: when no usable URI is known.
        TrackingUnavailableError, MlflowException: when the server cannot be reached or
            rejects the data; the file is then left in place.
    """
    path = Path(path)
    records = _read_records(path)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = (record.get("experiment_id"), record.get("parent_run_id"),
               record.get("trial_id"), record.get("run_id"))
        groups.setdefault(key, []).append(record)

    sent = 0
    for (experiment_id, parent_run_id, trial_id, run_id), group in groups.items():
        header = next((r for r in group if r.get("kind") == "trial"), {})
        tracking_uri = uri or header.get("tracking_uri")
        if not tracking_uri or MASK in tracking_uri:
            raise ValueError(f"{path} does not hold a usable tracking URI (credentials are "
                             "masked when saved); pass the URI explicitly")
        client = MlflowClient(tracking_uri=tracking_uri)

        def import_group(group=group, header=header, client=client, run_id=run_id,
                         experiment_id=experiment_id, parent_run_id=parent_run_id,
                         trial_id=trial_id) -> int:
            if run_id is None:
                run_id, _ = find_or_create_child(
                    client, experiment_id=experiment_id, parent_run_id=parent_run_id,
                    trial_id=trial_id, tags=header.get("tags", {}),
                    run_name=header.get("run_name", trial_id))
            if header.get("params"):
                log_params_once(client, run_id, header["params"])
            for record in group:
                if record["kind"] == "tags":
                    log_tags(client, run_id, record["tags"])
            metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                       for r in group if r["kind"] == "metric"]
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
            for record in group:
                if record["kind"] != "artifact":
                    continue
                local = Path(record["local_path"])
                if local.exists():
                    client.log_artifact(run_id, str(local), artifact_path=record["artifact_path"])
                else:
                    logger.warning("artifact %s listed in %s no longer exists; skipped", local,
                                   path)
            for record in group:
                if record["kind"] == "status":
                    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
            return len(metrics)

        sent += call_with_retry(import_group, budget_s=budget_s,
                                request_timeout_s=ARTIFACT_REQUEST_TIMEOUT_S,
                                description=f"importing trial {trial_id} from {path}")

    if rename and path.exists():
        target = path.with_name(f"{path.stem}.imported-{time.strftime('%Y%m%d-%H%M%S')}"
                                f"{path.suffix}")
        path.rename(target)
    logger.info("imported %d metric points from %s into %s", sent, path,
                redact(uri or "the saved tracking URI"))
    return sent

