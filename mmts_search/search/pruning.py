"""Tune trial schedulers that let Optuna pruners, or Tune's ASHA, stop trials.

Choosing points (the sampler inside `StudySearch`) and stopping trials (a Tune scheduler)
stay separate. Every result a trial reports goes first to the scheduler, which forwards
its objective to the trial's Optuna trial (``Trial.report(value, step)``) and returns
``TrialScheduler.STOP`` when the pruner decides to prune (``Trial.should_prune()``).
The searcher then records the trial in the study as ``PRUNED``.

Steps: a trial reports once per epoch, with ``epoch`` counted from 1, and the step is the
epoch. The Wilcoxon pruner compares trials across datasets instead: each epoch reports
the objective metric of every dataset, ``<dataset>/<metric>``, at step
``epoch * n_datasets + dataset_index``, so each (epoch, dataset) pair is one paired sample.

``pruner.grace_epochs`` is the number of epochs every trial runs before it may be pruned.
No trial is pruned at its last epoch, where stopping saves nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from mmts_search.search.searcher import StudySearch

__all__ = [
    "AshaPruningScheduler",
    "OptunaPruningScheduler",
    "default_startup_trials",
    "make_pruner",
    "make_scheduler",
]

logger = logging.getLogger(__name__)

OPTUNA_PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon",
                  "patient")


def default_startup_trials(num_samples: int) -> int:
    """Return how many trials must complete before a median or percentile pruner acts.

    Optuna's default of 5 would never prune a sweep of 8 trials with 2 running at once.
    A quarter of the budget, between 1 and 5, prunes small sweeps, and a large sweep
    still waits for more than the first lucky or unlucky trial.
    """
    return max(1, min(5, num_samples // 4))


def make_pruner(
    pruner: Any, *, epochs: int, n_datasets: int, num_samples: int
) -> optuna.pruners.BasePruner | None:
    """Return the Optuna pruner of a `PrunerSpec`, or None for ``asha`` and ``none``.

    Args:
        pruner: the sweep's ``pruner`` section (`mmts_search.spec.PrunerSpec`).
        epochs: training epochs of each trial (the maximum resource of Hyperband).
        n_datasets: datasets per trial; Wilcoxon gets ``grace_epochs * n_datasets``
            startup steps because each epoch reports once per dataset.
        num_samples: trial budget (sizes ``n_startup_trials``, see
            `default_startup_trials`).
    """
    kind = pruner.kind
    grace = int(pruner.grace_epochs)
    startup = default_startup_trials(num_samples)
    if kind in ("asha", "none"):
        return None
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=grace)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(
            float(pruner.percentile), n_startup_trials=startup, n_warmup_steps=grace
        )
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, grace), reduction_factor=int(pruner.reduction_factor)
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, grace), max_resource=max(epochs, max(1, grace)),
            reduction_factor=int(pruner.reduction_factor),
        )
    if kind == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(
            p_threshold=float(pruner.p_threshold), n_startup_steps=grace * n_datasets
        )
    if kind == "patient":
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=grace),
            patience=int(pruner.patience), min_delta=float(pruner.min_delta),
        )
    raise ValueError(f"unknown pruner.kind {kind!r}; expected one of "
                     f"{', '.join(OPTUNA_PRUNERS)}, asha or none")


class _ReportForwarding:
    """Forwarding of each Tune result to the Optuna trial, shared by both schedulers."""

    searcher: StudySearch
    metric_key: str
    dataset_keys: tuple[str, ...]
    max_epochs: int

    def _setup_forwarding(
        self,
        searcher: StudySearch,
        *,
        metric_key: str,
        max_epochs: int,
        dataset_keys: Sequence[str] = (),
    ) -> None:
        self.searcher = searcher
        self.metric_key = metric_key
        self.dataset_keys = tuple(dataset_keys)
        self.max_epochs = int(max_epochs)

    def _forward(self, trial_id: str, result: Mapping[str, Any]) -> int:
        """Report the result's objective to Optuna; return the result's epoch (1-based)."""
        epoch = _epoch_of(result)
        if result.get("diverged"):
            return epoch

        if self.dataset_keys:
            n_datasets = len(self.dataset_keys)
            for index, key in enumerate(self.dataset_keys):
                value = _finite(result.get(key))
                if value is not None:
                    self.searcher.report(trial_id, value, epoch * n_datasets + index)
        else:
            value = _finite(result.get(self.metric_key))
            if value is not None:
                self.searcher.report(trial_id, value, epoch)
        return epoch


class OptunaPruningScheduler(FIFOScheduler, _ReportForwarding):
    """FIFO scheduler that stops a trial when the study's Optuna pruner decides to prune.

    It runs trials in order, like `FIFOScheduler`. On each result it reports the
    objective to the trial's Optuna trial and calls ``should_prune()``. With a
    `optuna.pruners.NopPruner` on the study (``pruner.kind: none``) it only records
    the learning curves in the study.

    Example:
        >>> scheduler = OptunaPruningScheduler(searcher, metric_key="objective",
        ...                                    max_epochs=8)  # doctest: +SKIP
        >>> tune.TuneConfig(search_alg=searcher, scheduler=scheduler)  # doctest: +SKIP

    Args:
        searcher: the `StudySearch` that owns the Optuna trials.
        metric_key: Tune result key of the objective (``objective``).
        max_epochs: epochs of a full trial; no trial is pruned at its last epoch.
        dataset_keys: ``<dataset>/<metric>`` keys, in dataset order, for the Wilcoxon
            pruner's one-report-per-dataset steps; empty for one report per epoch.
    """

    def __init__(
        self,
        searcher: StudySearch,
        *,
        metric_key: str,
        max_epochs: int,
        dataset_keys: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._setup_forwarding(searcher, metric_key=metric_key, max_epochs=max_epochs,
                               dataset_keys=dataset_keys)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """Forward the result to Optuna; return STOP when the pruner prunes the trial."""
        epoch = self._forward(trial.trial_id, result)
        if result.get("diverged") or epoch >= self.max_epochs:
            return TrialScheduler.CONTINUE
        if not self.searcher.should_prune(trial.trial_id):
            return TrialScheduler.CONTINUE

        self.searcher.mark_pruned(trial.trial_id, epoch)
        logger.info("trial %s pruned after epoch %d of %d (%s=%s)", trial.trial_id, epoch,
                    self.max_epochs, self.metric_key, result.get(self.metric_key))
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        """Return the scheduler's line of Tune's status output."""
        pruner = type(self.searcher.study.pruner).__name__
        return f"Using Optuna pruner {pruner} (stopped {len(self.searcher._pruned_epochs)})."


class AshaPruningScheduler(ASHAScheduler, _ReportForwarding):
    """Tune's ASHA that also reports to Optuna and marks the trials it stops as pruned.

    Args:
        searcher: the `StudySearch` that owns the Optuna trials.
        metric_key: Tune result key of the objective (``objective``).
        mode: ``max`` or ``min``.
        max_epochs: epochs of a full trial (ASHA's ``max_t``).
        grace_epochs: epochs before ASHA may stop a trial (``grace_period``).
        reduction_factor: ASHA's ``reduction_factor`` (keeps 1/rf of the trials per rung).
    """

    def __init__(
        self,
        searcher: StudySearch,
        *,
        metric_key: str,
        mode: str,
        max_epochs: int,
        grace_epochs: int,
        reduction_factor: int,
    ) -> None:
        super().__init__(
            time_attr="epoch", metric=metric_key, mode=mode, max_t=max(1, max_epochs),
            grace_period=max(1, min(grace_epochs, max_epochs)),
            reduction_factor=reduction_factor,
        )
        self._setup_forwarding(searcher, metric_key=metric_key, max_epochs=max_epochs)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """Forward the result to Optuna; let ASHA decide, and record its early stops."""
        epoch = self._forward(trial.trial_id, result)
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and epoch < self.max_epochs:
            self.searcher.mark_pruned(trial.trial_id, epoch)
            logger.info("trial %s stopped by ASHA after epoch %d of %d", trial.trial_id,
                        epoch, self.max_epochs)
        return decision


def make_scheduler(
    spec: Any, searcher: StudySearch
) -> TrialScheduler:
    """Return the Tune scheduler of a sweep: `OptunaPruningScheduler` or ASHA.

    A multi-objective sweep gets a plain `FIFOScheduler`: Optuna keeps no intermediate
    values for several objectives, so neither its pruners nor ASHA apply.
    """
    kind = spec.pruner.kind
    epochs = int(spec.training.epochs)
    if searcher.is_multi_objective:
        if kind != "none":
            logger.warning("sweep %s: pruner %r is ignored because the objective has several "
                           "metrics; every trial runs all %d epochs", spec.name, kind, epochs)
        return FIFOScheduler()

    if kind == "asha":
        return AshaPruningScheduler(
            searcher, metric_key="objective", mode=spec.objective.mode, max_epochs=epochs,
            grace_epochs=int(spec.pruner.grace_epochs),
            reduction_factor=int(spec.pruner.reduction_factor),
        )

    dataset_keys: tuple[str, ...] = ()
    metric = spec.objective.metric
    if kind == "wilcoxon" and len(spec.datasets) > 1 and "/" not in metric:
        # A metric of one dataset (``<dataset>/<metric>``) has no per-dataset samples.
        dataset_keys = tuple(f"{ds.name}/{metric}" for ds in spec.datasets)
    return OptunaPruningScheduler(
        searcher, metric_key="objective", max_epochs=epochs, dataset_keys=dataset_keys
    )


def _epoch_of(result: Mapping[str, Any]) -> int:
    epoch = result.get("epoch")
    if epoch is None:
        epoch = result.get("training_iteration", 0)
    return int(epoch)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
