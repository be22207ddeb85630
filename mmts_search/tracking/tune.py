"""Ray Tune callback that ends each trial's MLflow child run with the trial's state.

Imported only by `SweepRun.tune_callback`, so that workers and the report command do
not import Ray Tune.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mmts_search.tracking._secrets import redact

logger = logging.getLogger(__name__)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def trial_error_text(trial: Any) -> str:
    """Return the error of a failed Tune trial as text (``Trial.get_error``, else its file)."""
    get_error = getattr(trial, "get_error", None)
    if callable(get_error):
        try:
            error = get_error()
        except Exception as lookup_error:  # noqa: BLE001 - the error file may be gone
            logger.debug("trial %s: get_error failed: %s", trial.trial_id, lookup_error)
        else:
            if error is not None:
                # Ray wraps the trial's exception in a RayTaskError whose text is a whole
                # traceback with terminal colours; the cause is what a reader needs.
                cause = getattr(error, "cause", None)
                if isinstance(cause, BaseException):
                    error = cause
                return _ANSI_ESCAPE.sub("", f"{type(error).__name__}: {error}")
    message = getattr(trial, "error_msg", None)
    if message:
        return str(message)
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).is_file():
        return Path(error_file).read_text(encoding="utf-8", errors="replace")[-4000:]
    return "trial failed (Ray Tune recorded no error message)"


class MlflowTrialStatusCallback(Callback):
    """End child runs as FINISHED, KILLED (pruned, with ``pruned_epoch``) or FAILED.

    Its state is the run context and ``pruned_lookup``. The MLflow client is made on
    first use and dropped when Tune pickles the callback into its experiment state.
    """

    def __init__(self, run_context: Mapping[str, str],
                 pruned_lookup: Callable[[str], int | None]) -> None:
        self._run_context = dict(run_context)
        self._pruned_lookup = pruned_lookup
        self._sweep: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sweep"] = None
        return state

    def _sweep_run(self) -> Any:
        if self._sweep is None:
            from mmts_search.tracking.sweep import SweepRun

            self._sweep = SweepRun.attach(self._run_context)
        return self._sweep

    def _end(self, trial: Any, **kwargs: Any) -> None:
        # A tracking failure must not stop the sweep; close_dangling_children repairs
        # runs left RUNNING at the end.
        try:
            self._sweep_run().end_trial(str(trial.trial_id), **kwargs)
        except Exception as error:  # noqa: BLE001
            logger.warning("trial %s: updating its MLflow run failed: %s", trial.trial_id,
                           redact(error))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """End the run KILLED when the pruner stopped the trial, else FINISHED."""
        self._end(trial, pruned_epoch=self._pruned_lookup(str(trial.trial_id)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """End the run FAILED with the trial's error in the ``error`` tag."""
        self._end(trial, error=trial_error_text(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Leave the run RUNNING: the retried trial continues it."""
        logger.info("trial %s failed and is retried; it continues its MLflow run",
                    trial.trial_id)
