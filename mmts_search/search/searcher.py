"""Ray Tune searcher backed by a persistent Optuna study, with pruned and failed trials.

`StudySearch` extends Ray's `OptunaSearch` (``ray.tune.search.optuna``, Ray 2.60) in four
ways:

- intermediate values reach the Optuna trial through `report` (called by the schedulers of
  `mmts_search.search.pruning`), at the step those schedulers choose, instead of through
  `on_trial_result`, which would report at Tune's ``training_iteration``;
- a trial stopped by a pruner is recorded (``Study.tell``) as ``PRUNED``, keeping its
  intermediate values, so the sampler learns from it. `pruned_epoch` returns the epoch
  it stopped after, for the tracking callback;
- a trial whose last report has ``diverged: 1``, that errored, or that ended without the
  objective is recorded as ``FAIL``. It is FAIL and not PRUNED because its values do not
  rank the point: a sampler must not treat a NaN loss as a low score;
- after `Tuner.restore`, study trials left ``RUNNING`` by the killed driver and unknown to
  the restored searcher are recorded as ``FAIL`` (see `restore`).

`make_sampler` maps ``search.algorithm`` to the Optuna sampler.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

__all__ = ["StudySearch", "make_sampler", "nsga2_population_size"]

logger = logging.getLogger(__name__)


class _TuneGridSampler(optuna.samplers.GridSampler):
    """`GridSampler` that leaves ending the search to Tune's ``num_samples``.

    Optuna's version calls `Study.stop` once every grid point was visited, which raises
    outside `Study.optimize`, where Tune drives the study through ask and tell.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - optuna types
        return None


class _PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """`NSGAIISampler` that survives pickling, which Tune does to save the searcher.

    NOTE: Optuna 5.1's genetic-algorithm samplers hold a `threading.Lock` in
    ``_thread_lock``, which cannot be pickled; it is dropped and recreated here.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def nsga2_population_size(num_samples: int) -> int:
    """Return the NSGA-II generation size for a sweep of ``num_samples`` trials.

    Optuna's default of 50 would make every trial of a small sweep a random one. A
    quarter of the budget, between 2 and 50, leaves at least a few generations.
    """
    return max(2, min(50, num_samples // 4))


def make_sampler(
    algorithm: str,
    *,
    seed: int,
    num_samples: int,
    max_concurrent: int,
    grid_labels: list[str] | None = None,
) -> optuna.samplers.BaseSampler:
    """Return the Optuna sampler of ``search.algorithm``.

    Args:
        algorithm: ``tpe``, ``random``, ``cmaes``, ``grid`` or ``nsga2``.
        seed: sampler seed; the same seed and the same results give the same points.
        num_samples: trial budget of the sweep (sizes the NSGA-II generations).
        max_concurrent: trials that run at once (TPE then uses the constant liar).
        grid_labels: point labels of the grid (`SearchSpace.grid_points`), for ``grid``.

    Raises:
        ValueError: for an unknown algorithm, or ``grid`` without labels.
    """
    with warnings.catch_warnings():
        # multivariate/group TPE and the constant liar are marked experimental in Optuna 5.1.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,  # the space is conditional: each family has its own parameters
            constant_liar=max_concurrent > 1,
        )
        if algorithm == "tpe":
            return tpe
        if algorithm == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if algorithm == "cmaes":
            # CMA-ES handles only numbers; `family` and the categoricals go to TPE.
            return optuna.samplers.CmaEsSampler(
                seed=seed, independent_sampler=tpe, warn_independent_sampling=False
            )
        if algorithm == "grid":
            if not grid_labels:
                raise ValueError("search.algorithm 'grid' needs the grid point labels")
            return _TuneGridSampler({"grid_point": grid_labels}, seed=seed)
        if algorithm == "nsga2":
            return _PicklableNSGAIISampler(
                seed=seed, population_size=nsga2_population_size(num_samples)
            )
    raise ValueError(
        f"unknown search.algorithm {algorithm!r}; expected tpe, random, cmaes, grid or nsga2"
    )


class StudySearch(OptunaSearch):
    """`OptunaSearch` that records pruned, diverged and failed trials in the study.

    Args:
        space: define-by-run function (`mmts_search.search.space.SearchSpace`).
        metric: Tune result key of the objective, or one key per objective.
        mode: ``max`` or ``min``, or one per objective.
        sampler: Optuna sampler (`make_sampler`).
        study_name: Optuna study name (the sweep name).
        storage: Optuna storage, for example an `optuna.storages.RDBStorage` on
            ``sqlite:///.../optuna.db``; None keeps the study in memory.
        pruner: Optuna pruner that `should_prune` calls; None never prunes.
    """

    def __init__(
        self,
        space: Callable[[optuna.trial.Trial], dict[str, Any]],
        *,
        metric: str | list[str],
        mode: str | list[str],
        sampler: optuna.samplers.BaseSampler,
        study_name: str,
        storage: optuna.storages.BaseStorage | None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        super().__init__(
            space, metric=metric, mode=mode, sampler=sampler,
            study_name=study_name, storage=storage,
        )
        # Ray creates the study with a NopPruner. The pruner must be set on the study so
        # that `Trial.should_prune` uses it and TPE reads a HyperbandPruner's brackets.
        self.study.pruner = pruner or optuna.pruners.NopPruner()
        self._pruned_epochs: dict[str, int] = {}
        self._reported_steps: dict[str, set[int]] = {}

    @property
    def study(self) -> optuna.Study:
        """The Optuna study that contains every trial of the sweep."""
        return cast(optuna.Study, self._ot_study)

    @property
    def is_multi_objective(self) -> bool:
        """Whether the sweep optimizes several metrics at once (a Pareto front)."""
        return isinstance(self.metric, list)

    def optuna_trial(self, trial_id: str) -> optuna.trial.Trial | None:
        """Return the Optuna trial of Tune trial ``trial_id``, or None if never suggested."""
        # NOTE: `_ot_trials` (Tune trial id -> optuna.trial.Trial) is a private attribute of
        # Ray's OptunaSearch (Ray 2.60). No public accessor exists; a Ray upgrade that
        # renames it breaks pruning here, and the pruning tests catch that.
        return self._ot_trials.get(trial_id)

    def trial_ids_by_number(self) -> dict[int, str]:
        """Return Optuna trial number -> Tune trial id for every trial this searcher asked."""
        return {ot_trial.number: trial_id for trial_id, ot_trial in self._ot_trials.items()}

    def report(self, trial_id: str, value: float, step: int) -> bool:
        """Report an intermediate ``value`` at ``step`` to the trial's Optuna trial.

        Returns whether the value was stored: a non-finite value, a repeated step (a
        trial resumed from a checkpoint reports its last epoch again), an unknown trial
        and a multi-objective study (Optuna has no intermediate values there) store nothing.
        """
        ot_trial = self.optuna_trial(trial_id)
        if ot_trial is None or self.is_multi_objective or trial_id in self._completed_trials:
            return False
        if not math.isfinite(value):
            return False
        steps = self._reported_steps.setdefault(trial_id, set())
        if step in steps:
            return False
        ot_trial.report(float(value), step)
        steps.add(step)
        return True

    def should_prune(self, trial_id: str) -> bool:
        """Return the pruner's verdict on the trial's intermediate values so far."""
        ot_trial = self.optuna_trial(trial_id)
        if ot_trial is None or self.is_multi_objective:
            return False
        return bool(ot_trial.should_prune())

    def mark_pruned(self, trial_id: str, epoch: int) -> None:
        """Record that a scheduler stopped ``trial_id`` after ``epoch`` (1-based)."""
        self._pruned_epochs[trial_id] = int(epoch)

    def pruned_epoch(self, trial_id: str) -> int | None:
        """Return the epoch after which ``trial_id`` was pruned, or None if it was not."""
        return self._pruned_epochs.get(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Ignore results: the scheduler reports them through `report` at its own steps."""
        return None

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Tell the Optuna study how the trial ended: COMPLETE, PRUNED or FAIL."""
        if trial_id in self._completed_trials:
            return
        ot_trial = self.optuna_trial(trial_id)
        if ot_trial is None:
            self._completed_trials.add(trial_id)
            return

        if self._is_finished(ot_trial.number):
            # The trial ended before a driver crash, after Tune's last experiment
            # checkpoint; the restored Tune trial ended again and the study keeps the
            # first verdict.
            logger.info("study %s: trial %s (Optuna trial %d) already finished; its first "
                        "state is kept",
                        self._study_name, trial_id, ot_trial.number)
            self._completed_trials.add(trial_id)
            return

        state, values = self._final_state(trial_id, result, error)
        try:
            self.study.tell(ot_trial, values, state=state)
        except (RuntimeError, ValueError) as exc:
            logger.warning("study %s: could not tell trial %s (Optuna trial %d) as %s: %s",
                           self._study_name, trial_id, ot_trial.number, state.name, exc)
        else:
            logger.info("study %s: trial %s (Optuna trial %d) ended %s",
                        self._study_name, trial_id, ot_trial.number, state.name)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Restore the searcher state saved by Tune, then fail orphaned study trials.

        A driver killed between two Tune checkpoints can leave study trials ``RUNNING``
        that the restored searcher has no record of. Tune suggests their replacements
        anew, so they are recorded as ``FAIL`` to keep the study's counts correct.
        """
        super().restore(checkpoint_path)
        self.fail_orphaned_trials()

    def fail_orphaned_trials(self) -> int:
        """Tell ``FAIL`` to ``RUNNING`` study trials that no Tune trial owns; return how many.

        NOTE: this assumes that one driver at a time uses the study. A second sweep that
        runs under the same study name and storage would lose its running trials.
        """
        owned = {trial.number for trial in self._ot_trials.values()}
        orphans = [
            trial for trial in self.study.get_trials(deepcopy=False,
                                                         states=(TrialState.RUNNING,))
            if trial.number not in owned
        ]
        for trial in orphans:
            self.study.tell(trial.number, state=TrialState.FAIL)
        if orphans:
            logger.warning("study %s: marked %d orphaned RUNNING trial(s) as FAIL: %s",
                           self._study_name, len(orphans), [t.number for t in orphans])
        return len(orphans)

    def _is_finished(self, number: int) -> bool:
        finished = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        return any(trial.number == number for trial in finished)

    def _final_state(
        self, trial_id: str, result: Mapping[str, Any] | None, error: bool
    ) -> tuple[TrialState, list[float] | None]:
        if error:
            return TrialState.FAIL, None
        if result and result.get("diverged"):
            logger.warning("trial %s diverged: %s", trial_id, result.get("error", "no reason"))
            return TrialState.FAIL, None
        if trial_id in self._pruned_epochs:
            return TrialState.PRUNED, None

        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [None if not result else result.get(name) for name in metrics]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            logger.warning("trial %s ended without a finite value of %s; telling FAIL",
                           trial_id, metrics)
            return TrialState.FAIL, None
        return TrialState.COMPLETE, [float(v) for v in values]  # type: ignore[arg-type]
