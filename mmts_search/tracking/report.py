"""Leaderboards: normalizing the driver's table, reading one back from MLflow, rendering."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from mmts_search.tracking._secrets import redact
from mmts_search.tracking._store import (
    ROLE_PARENT,
    TAG_FAMILY,
    TAG_OBJECTIVE_MODE,
    TAG_PRUNED,
    TAG_PRUNED_EPOCH,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    call_with_retry,
    child_runs,
    quote_filter_value,
    resolve_tracking_uri,
    search_all_runs,
)

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("objective", "epochs", "head_rsum", "mid_rsum", "tail_rsum", "rsum")
LEADERBOARD_COLUMNS = ("trial_id", "family", "objective", "status", "epochs", "head_rsum",
                       "mid_rsum", "tail_rsum", "rsum")
TRIAL_STATES = ("COMPLETE", "PRUNED", "FAILED", "KILLED", "RUNNING")
REPORT_FORMATS = ("table", "csv", "json")
# Params of a child run that describe the trial rather than the schedule.
_META_PARAMS = ("family", "trial_id", "optuna_trial_number")


def _first_mode(mode: str | list[str] | tuple[str, ...]) -> str:
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if mode else "max"
    mode = str(mode).split(",")[0].strip().lower()
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min' but got {mode!r}")
    return mode


def normalize_leaderboard(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with every expected column, numbers as floats, states upper case.

    Expected columns (the driver's leaderboard): ``trial_id``, ``family``, the schedule
    params (one column each, NaN where a family lacks the param), ``objective``,
    ``status`` (COMPLETE, PRUNED, FAILED), ``epochs``, ``head_rsum``, ``mid_rsum``,
    ``tail_rsum``, ``rsum``. A missing column is added: ``status`` as COMPLETE, the
    others as NaN.
    """
    table = leaderboard.copy()
    for column in LEADERBOARD_COLUMNS:
        if column not in table.columns:
            table[column] = "COMPLETE" if column == "status" else float("nan")
    for column in METRIC_COLUMNS:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table["status"] = table["status"].astype(str).str.upper()
    table["trial_id"] = table["trial_id"].astype(str)
    table["family"] = table["family"].astype(str)
    return table


def sort_leaderboard(leaderboard: pd.DataFrame, *, mode: str = "max") -> pd.DataFrame:
    """Return the rows best objective first (NaN last) for ``mode`` ``max`` or ``min``."""
    ascending = _first_mode(mode) == "min"
    return leaderboard.sort_values("objective", ascending=ascending, na_position="last",
                                   kind="stable").reset_index(drop=True)


def best_per_family(leaderboard: pd.DataFrame, *, mode: str = "max") -> pd.DataFrame:
    """Return the best trial of each schedule family, best family first.

    The best trial is the complete trial with the best objective. A family without a
    complete trial is represented by its best trial of any state that has an objective.

    Args:
        leaderboard: rows as described in `normalize_leaderboard`.
        mode: ``"max"`` or ``"min"`` (the first objective's mode for nsga2).

    Returns:
        One row per family with an objective; empty when there is none.
    """
    table = sort_leaderboard(normalize_leaderboard(leaderboard), mode=mode)
    table = table[table["objective"].notna()]
    complete = table[table["status"] == "COMPLETE"].drop_duplicates("family", keep="first")
    others = table[~table["family"].isin(complete["family"])].drop_duplicates(
        "family", keep="first")
    return sort_leaderboard(pd.concat([complete, others]), mode=mode)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _trial_state(run: Run) -> str:
    status = run.info.status
    if status == "FINISHED":
        return "COMPLETE"
    if status == "KILLED":
        return "PRUNED" if run.data.tags.get(TAG_PRUNED) == "true" else "KILLED"
    if status in ("RUNNING", "SCHEDULED"):
        return "RUNNING"
    return "FAILED"


def _trial_row(run: Run, sweep: str) -> dict[str, object]:
    metrics = run.data.metrics
    params = run.data.params
    tags = run.data.tags
    epochs: float | str | None = metrics.get("epoch")
    if epochs is None and tags.get(TAG_PRUNED_EPOCH):
        epochs = _number(tags[TAG_PRUNED_EPOCH])
    row: dict[str, object] = {
        "trial_id": tags.get(TAG_TRIAL_ID, params.get("trial_id", "")),
        "family": params.get("family", tags.get(TAG_FAMILY, "")),
    }
    row.update({key: _number(value) for key, value in sorted(params.items())
                if key not in _META_PARAMS})
    row.update({
        "objective": metrics.get("objective"),
        "status": _trial_state(run),
        "epochs": epochs,
        "head_rsum": metrics.get("head_rsum"),
        "mid_rsum": metrics.get("mid_rsum"),
        "tail_rsum": metrics.get("tail_rsum"),
        "rsum": metrics.get("rsum"),
        "sweep": sweep,
        "optuna_trial_number": _number(params["optuna_trial_number"])
        if "optuna_trial_number" in params else None,
        "run_id": run.info.run_id,
    })
    return row


def leaderboard_from_mlflow(
    uri: str,
    *,
    experiment: str,
    sweep: str | None = None,
    top: int | None = 10,
    base_dir: Path | str | None = None,
) -> pd.DataFrame:
    """Read the trials of one sweep (or all sweeps) of an experiment back from MLflow.

    Args:
        uri: tracking URI; a relative ``sqlite:///`` path is resolved against
            ``base_dir`` (default: the working directory).
        experiment: the experiment name.
        sweep: the sweep name (``mmts.sweep`` tag); None takes every sweep.
        top: keep the best ``top`` rows; None or 0 keeps all.
        base_dir: directory for relative URIs.

    Returns:
        One row per trial, best objective first (the mode stored on the newest parent
        run), with ``trial_id``, ``family``, one column per schedule param,
        ``objective``, ``status`` (COMPLETE, PRUNED, FAILED, KILLED, RUNNING),
        ``epochs``, ``head_rsum``, ``mid_rsum``, ``tail_rsum``, ``rsum``, ``sweep``,
        ``optuna_trial_number`` and ``run_id``. The metric values are the last reported
        ones.

    Raises:
        ValueError: when the experiment or the sweep does not exist.
    """
    resolved = resolve_tracking_uri(uri, base_dir or Path.cwd())
    client = MlflowClient(tracking_uri=resolved)
    found = call_with_retry(lambda: client.get_experiment_by_name(experiment), budget_s=5)
    if found is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise ValueError(f"experiment {experiment!r} not found at {redact(resolved)}; "
                         f"existing experiments: {names}")

    parent_filter = f"tags.`{TAG_ROLE}` = '{ROLE_PARENT}'"
    if sweep is not None:
        parent_filter += f" and tags.`{TAG_SWEEP}` = {quote_filter_value(sweep)}"
    parents = search_all_runs(client, [found.experiment_id], parent_filter,
                              order_by=["attributes.start_time DESC"])
    if not parents:
        if sweep is not None:
            raise ValueError(f"sweep {sweep!r} has no parent run in experiment {experiment!r}")
        return pd.DataFrame(columns=[*LEADERBOARD_COLUMNS, "sweep", "run_id"])

    rows = []
    for parent in parents:
        sweep_name = parent.data.tags.get(TAG_SWEEP, parent.info.run_name or "")
        for child in child_runs(client, found.experiment_id, parent.info.run_id):
            rows.append(_trial_row(child, sweep_name))

    columns = [*LEADERBOARD_COLUMNS, "sweep", "run_id"]
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    mode = parents[0].data.tags.get(TAG_OBJECTIVE_MODE, "max")
    table = sort_leaderboard(normalize_leaderboard(table), mode=mode)
    return table.head(top) if top else table


def render_report(leaderboard: pd.DataFrame, fmt: str = "table") -> str:
    """Render a leaderboard as a text table, CSV or JSON (a list of row objects).

    Args:
        leaderboard: any DataFrame, usually from `leaderboard_from_mlflow`.
        fmt: ``"table"``, ``"csv"`` or ``"json"``.

    Raises:
        ValueError: for another format.
    """
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"format must be one of {REPORT_FORMATS} but got {fmt!r}")
    if fmt == "csv":
        return leaderboard.to_csv(index=False)
    if fmt == "json":
        records = json.loads(leaderboard.to_json(orient="records"))
        return json.dumps(records, indent=2)
    if leaderboard.empty:
        return "no trials found"
    return leaderboard.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
