"""Progress of a running sweep as events, one per trial result and per trial end.

`ProgressCallback` is a Tune callback that turns Tune's hooks into `ProgressEvent`s and
passes them to a plain function: the command line prints them, a notebook could plot
them. The callback keeps the best objective seen so far, over every result of every
trial, and logs each trial end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

__all__ = ["ProgressCallback", "ProgressEvent"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a sweep.

    Attributes:
        kind: ``result`` (a trial reported an epoch), ``complete``, ``pruned`` or
            ``failed`` (the trial ended that way).
        trial_id: Tune trial id.
        epoch: last epoch the trial reported (1-based; 0 before the first report).
        max_epochs: epochs of a full trial.
        objective: the trial's last objective value, or None.
        best_objective: best objective over every result so far, or None.
        best_trial_id: trial that reported ``best_objective``.
        ended: trials that have ended (complete, pruned or failed) so far.
        total: trials of the sweep (``num_samples``).
        config: the trial's schedule family and parameters.
        message: reason of a failure or divergence, else empty.
    """

    kind: str
    trial_id: str
    epoch: int
    max_epochs: int
    objective: float | None
    best_objective: float | None
    best_trial_id: str | None
    ended: int
    total: int
    config: dict[str, Any] = field(default_factory=dict)
    message: str = ""


class ProgressCallback(Callback):
    """Tune callback that sends a `ProgressEvent` to ``sink`` for each result and trial end.

    Args:
        sink: function called with each event; exceptions it raises are logged and
            dropped, so a broken display never stops a sweep.
        mode: ``max`` or ``min``: which objective counts as the best.
        max_epochs: epochs of a full trial.
        total: trials of the sweep.
        pruned_lookup: returns the pruned epoch of a trial id, or None if not pruned.
        already_ended: trials that ended before this driver run (when resuming).
    """

    def __init__(
        self,
        sink: Callable[[ProgressEvent], None] | None,
        *,
        mode: str,
        max_epochs: int,
        total: int,
        pruned_lookup: Callable[[str], int | None],
        already_ended: int = 0,
    ) -> None:
        self._sink = sink
        self._sign = 1.0 if mode == "max" else -1.0
        self._max_epochs = max_epochs
        self._total = total
        self._pruned_lookup = pruned_lookup
        self._best: float | None = None
        self._best_trial: str | None = None
        self._ended = already_ended

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        """Send a ``result`` event with the best objective so far."""
        objective = _finite(result.get("objective"))
        if objective is not None and (
            self._best is None or self._sign * objective > self._sign * self._best
        ):
            self._best, self._best_trial = objective, trial.trial_id
        self._emit("result", trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Send a ``complete``, ``pruned`` or ``failed`` (diverged) event."""
        self._ended += 1
        result = trial.last_result or {}
        if result.get("diverged"):
            kind = "failed"
            message = f"diverged: {result.get('error', 'no reason given')}"
        elif self._pruned_lookup(trial.trial_id) is not None:
            kind, message = "pruned", ""
        else:
            kind, message = "complete", ""
        logger.info("trial %s ended %s after epoch %d", trial.trial_id, kind.upper(),
                    int(result.get("epoch") or 0))
        self._emit(kind, trial, result, message)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Send a ``failed`` event naming the error file."""
        self._ended += 1
        message = f"error, see {trial.error_file}" if getattr(trial, "error_file", None) \
            else "error"
        logger.error("trial %s failed: %s", trial.trial_id, message)
        self._emit("failed", trial, trial.last_result or {}, message)

    def _emit(self, kind: str, trial: Any, result: dict, message: str = "") -> None:
        if self._sink is None:
            return
        config = {k: v for k, v in (trial.config or {}).items() if k != "optuna_trial_number"}
        event = ProgressEvent(
            kind=kind,
            trial_id=trial.trial_id,
            epoch=int(result.get("epoch") or 0),
            max_epochs=self._max_epochs,
            objective=_finite(result.get("objective")),
            best_objective=self._best,
            best_trial_id=self._best_trial,
            ended=self._ended,
            total=self._total,
            config=config,
            message=message,
        )
        try:
            self._sink(event)
        except Exception:  # noqa: BLE001 - a display error must not stop the sweep
            logger.exception("progress display failed on trial %s", trial.trial_id)

    def __getstate__(self) -> dict:
        # Tune may pickle callbacks; the sink (a console printer) stays in this process.
        state = self.__dict__.copy()
        state["_sink"] = None
        return state


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
