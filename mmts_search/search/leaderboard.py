"""Leaderboard of a finished sweep, built from Tune's results and the Optuna study."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from optuna.trial import TrialState
from ray.tune import Callback

from mmts_search.schedules import FAMILY_PARAMETERS
from mmts_search.search.searcher import StudySearch

__all__ = ["LEADERBOARD_COLUMNS", "TrialLedger", "best_row", "build_leaderboard"]

# Columns of every leaderboard; a multi-objective sweep adds one column per objective
# metric (when not already listed) and ``pareto``.
LEADERBOARD_COLUMNS = (
    "trial_id", "optuna_trial_number", "family", "params", "objective", "status", "epochs",
    "pruned_epoch", "head_rsum", "mid_rsum", "tail_rsum", "rsum",
)

_STATUS_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAILED": 3}
_STUDY_STATUS = {
    TrialState.COMPLETE: "COMPLETE",
    TrialState.PRUNED: "PRUNED",
    TrialState.FAIL: "FAILED",
    TrialState.RUNNING: "RUNNING",
    TrialState.WAITING: "RUNNING",
}


class TrialLedger(Callback):
    """Tune callback that records each trial's id and config, keyed by its trial folder.

    A trial that fails before its first report has an empty ``Result.metrics`` (no
    ``trial_id``, no ``config``); the ledger still names it in the leaderboard. Its
    state is saved with the experiment, so a resumed sweep keeps the earlier entries.
    """

    def __init__(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Record the trial's id and config under its folder."""
        self.trials[str(trial.path)] = {"trial_id": trial.trial_id,
                                        "config": dict(trial.config or {})}

    def get_state(self) -> dict | None:
        """Return the recorded trials for Tune's experiment checkpoint."""
        return {"trials": self.trials} if self.trials else None

    def set_state(self, state: dict) -> None:
        """Restore the trials recorded before a resume."""
        self.trials.update(state.get("trials", {}))


def build_leaderboard(
    results: Iterable[Any],
    *,
    searcher: StudySearch,
    metrics: Sequence[str],
    modes: Sequence[str],
    ledger: TrialLedger | None = None,
) -> pd.DataFrame:
    """Return one row per trial, best first.

    Args:
        results: Tune results (`ray.tune.ResultGrid` or a list of `ray.tune.Result`).
        searcher: the sweep's `StudySearch` (study states, pruned epochs).
        metrics: objective metric names (one, or several for a multi-objective sweep).
        modes: ``max`` or ``min`` per metric.
        ledger: ids and configs of trials that never reported (see `TrialLedger`).

    Returns:
        A DataFrame with `LEADERBOARD_COLUMNS`, then one column per schedule parameter
        (empty where the trial's family lacks it). ``status`` is COMPLETE, PRUNED, FAILED
        or RUNNING (a trial of an interrupted sweep). ``params`` is the JSON object of
        the family's parameters. ``objective`` is the last reported value (the first
        metric for several objectives). Rows are sorted by status (COMPLETE, PRUNED,
        RUNNING, FAILED), then by objective, best first.
    """
    study = searcher.study
    study_trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    pareto_numbers = _pareto_numbers(study) if len(metrics) > 1 else set()
    owner = searcher.trial_ids_by_number()

    rows = []
    param_names: set[str] = set()
    for result in results:
        metrics_row = dict(result.metrics or {})
        recorded = ledger.trials.get(str(result.path), {}) if ledger is not None else {}
        config = dict(result.config or recorded.get("config") or {})
        number = config.get("optuna_trial_number")
        trial_id = metrics_row.get("trial_id") or recorded.get("trial_id") \
            or (owner.get(number, "") if number is not None else "")
        family = config.get("family", "")
        params = {k: config[k] for k in FAMILY_PARAMETERS.get(family, ()) if k in config}
        pruned_epoch = searcher.pruned_epoch(trial_id) if trial_id else None

        param_names.update(params)
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "optuna_trial_number": number,
            "family": family,
            "params": json.dumps(params, sort_keys=True),
            "objective": _number(metrics_row.get("objective")),
            "status": _status(result, metrics_row, pruned_epoch,
                              study_trials.get(number) if number is not None else None),
            "epochs": int(metrics_row.get("epoch") or 0),
            "pruned_epoch": pruned_epoch,
            **params,
        }
        for key in ("head_rsum", "mid_rsum", "tail_rsum", "rsum", *metrics):
            row[key] = _number(metrics_row.get(key))
        if len(metrics) > 1:
            row["objective"] = row[metrics[0]]
            row["pareto"] = number in pareto_numbers
        rows.append(row)

    columns = list(LEADERBOARD_COLUMNS) + [m for m in metrics if m not in LEADERBOARD_COLUMNS]
    if len(metrics) > 1:
        columns.append("pareto")
    ordered_params = [name for family_names in FAMILY_PARAMETERS.values()
                      for name in family_names]
    columns += [name for name in dict.fromkeys(ordered_params) if name in param_names]
    frame = pd.DataFrame(rows, columns=columns)
    frame["pruned_epoch"] = frame["pruned_epoch"].astype("Int64")
    if frame.empty:
        return frame

    ascending = modes[0] == "min"
    frame["_status_rank"] = frame["status"].map(_STATUS_ORDER).fillna(9)
    frame = frame.sort_values(["_status_rank", "objective"], ascending=[True, ascending],
                              na_position="last", kind="stable")
    return frame.drop(columns="_status_rank").reset_index(drop=True)


def best_row(leaderboard: pd.DataFrame) -> pd.Series | None:
    """Return the best COMPLETE trial (on the Pareto front when there is one), or None."""
    if leaderboard.empty:
        return None
    complete = leaderboard[leaderboard["status"] == "COMPLETE"]
    if "pareto" in complete.columns and complete["pareto"].any():
        complete = complete[complete["pareto"]]
    complete = complete[complete["objective"].notna()]
    if complete.empty:
        return None
    return complete.iloc[0]


def _status(result: Any, metrics: dict, pruned_epoch: int | None, study_trial: Any) -> str:
    if getattr(result, "error", None) is not None or metrics.get("diverged"):
        return "FAILED"
    if pruned_epoch is not None:
        return "PRUNED"
    if study_trial is not None:
        return _STUDY_STATUS.get(study_trial.state, "FAILED")
    return "COMPLETE" if metrics.get("done") else "RUNNING"


def _pareto_numbers(study: Any) -> set[int]:
    try:
        return {trial.number for trial in study.best_trials}
    except (RuntimeError, ValueError):
        return set()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
