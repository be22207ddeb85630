"""Run and resume sweeps: Ray Tune trials, sampled by Optuna, recorded in MLflow.

`run_sweep` does, in order:

1. locates the experiment folder ``<storage>/<name>`` (`mmts_search.search.storage`),
   rejecting one that already contains a sweep (that one is for `resume_sweep`);
2. builds the define-by-run space (`SearchSpace`), and writes the resolved sweep file
   ``sweep.yaml`` to the state folder;
3. connects to Ray (a local instance, or the cluster at ``address``/``RAY_ADDRESS``) and
   checks that one node can hold a trial (`mmts_search.spec.check_resources`);
4. opens the MLflow parent run (`mmts_search.tracking.SweepRun`, preflight inside);
5. runs `ray.tune.Tuner.fit` with `StudySearch` (Optuna sampler and persistent study),
   the pruning scheduler, the trainable `workers.trainable.train_trial` with its
   resources, failure retries and checkpoints;
6. builds the leaderboard, writes ``best.yaml`` and hands both to the tracking module.

`resume_sweep` repeats steps 3 to 6 on the experiment folder of an interrupted sweep,
with `ray.tune.Tuner.restore`: finished trials are kept, unfinished and errored ones
continue from their last checkpoints, and Tune's trial counter keeps the total at
``search.num_samples``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import optuna
import pandas as pd

from mmts_search.search.leaderboard import TrialLedger, best_row, build_leaderboard
from mmts_search.search.progress import ProgressCallback, ProgressEvent
from mmts_search.search.pruning import make_pruner, make_scheduler
from mmts_search.search.searcher import StudySearch, make_sampler
from mmts_search.search.space import SearchSpace
from mmts_search.search.storage import (
    STATE_FILES,
    SWEEP_FILE,
    SweepLocation,
    locate_existing_sweep,
    locate_sweep,
)
from mmts_search.spec import (
    SweepSpec,
    check_resources,
    dump_sweep,
    parse_sweep,
    trial_spec,
)

__all__ = [
    "SweepError",
    "SweepOutcome",
    "build_search",
    "connect_ray",
    "resume_sweep",
    "run_sweep",
    "study_storage_url",
]

logger = logging.getLogger(__name__)

# Checkpoints kept per trial: the latest one, plus the one before in case the latest was
# being written when the driver died.
CHECKPOINTS_TO_KEEP = 2

# The trainable's signature: train_trial(config, *, sweep, run_context).
Trainable = Callable[..., None]
ProgressSink = Callable[[ProgressEvent], None]


class SweepError(RuntimeError):
    """A sweep cannot start or continue; the message gives the reason and the next step."""


@dataclass
class SweepOutcome:
    """Results of a finished or interrupted sweep.

    Attributes:
        name: sweep name (also the Optuna study name).
        experiment_uri: experiment folder, ``<storage>/<name>`` (local path or ``s3://``).
        state_dir: local folder of ``sweep.yaml``, ``optuna.db`` and ``best.yaml``.
        leaderboard: one row per trial, best first (`build_leaderboard`).
        finished: False when the driver stopped before every trial ended (resume it).
        num_samples: trial budget of the sweep.
        wall_s: seconds from the start of `Tuner.fit` to its end.
        study_storage: Optuna storage URL, for ``optuna-dashboard``.
        tracking_uri: MLflow tracking URI, or None without tracking.
        parent_run_id: MLflow parent run id, or None without tracking.
        best: ``{"trial_id", "family", "params", "objective"}`` of the best trial, or None.
        best_yaml: path of ``best.yaml``, or None when no trial completed.
        metrics: objective metric names (several for a multi-objective sweep).
        pareto: leaderboard rows on the Pareto front (multi-objective sweeps only).
    """

    name: str
    experiment_uri: str
    state_dir: Path
    leaderboard: pd.DataFrame
    finished: bool
    num_samples: int
    wall_s: float
    study_storage: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    best: dict[str, Any] | None = None
    best_yaml: Path | None = None
    metrics: list[str] = field(default_factory=list)
    pareto: pd.DataFrame = field(default_factory=pd.DataFrame)


# --------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------


def connect_ray(address: str | None = None, *, verbose: bool = False) -> bool:
    """Connect to Ray; return True when this call started a local instance.

    Args:
        address: ``host:port`` of a cluster's GCS, or ``auto``; None uses
            ``RAY_ADDRESS`` when set, else starts a local instance with one logical CPU
            per core of this machine and no dashboard.
        verbose: forward the trials' log lines to this process.

    Raises:
        SweepError: a Ray Client address (``ray://``), or a cluster that cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise SweepError(
            f"Ray Client addresses ({address}) are not supported: run the driver on the "
            "cluster with `mmts-search submit`, or pass the GCS address host:6379"
        )

    if address and address != "auto" and "://" not in address:
        _check_reachable(address)

    quiet = logging.INFO if verbose else logging.WARNING
    try:
        if address:
            logger.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, logging_level=quiet, log_to_driver=verbose)
            return False
        # "local" starts a new instance even when `ray start` left a cluster running on
        # this machine, which ray.init() would otherwise join.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 logging_level=quiet, log_to_driver=verbose)
    except ConnectionError as exc:
        raise SweepError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    logger.info("started a local Ray instance with %s CPUs", os.cpu_count())
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a GCS address with no server, where `ray.init` retries for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"invalid Ray address {address!r}: expected host:port (the GCS "
                         "port, 6379 by default) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SweepError(
            f"cannot connect to the Ray cluster at {address}: {exc}. Check the head's GCS "
            "address (port 6379 by default), or drop --address and RAY_ADDRESS to run on "
            "a local Ray instance."
        ) from None


def check_cluster_resources(spec: SweepSpec) -> None:
    """Check the trial's CPU and GPU request against the live nodes of the cluster.

    Raises:
        SweepValidationError: from `mmts_search.spec.check_resources`.
    """
    import ray

    check_resources(spec, ray.nodes())


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------


def study_storage_url(spec: SweepSpec, location: SweepLocation) -> str:
    """Return ``search.study_storage``, else SQLite ``optuna.db`` in the state folder."""
    if spec.search.study_storage:
        return spec.search.study_storage
    return f"sqlite:///{location.state_dir / 'optuna.db'}"


def open_study_storage(url: str) -> optuna.storages.BaseStorage:
    """Return an Optuna RDB storage for ``url``; SQLite waits up to 60 s for locks."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def build_search(
    spec: SweepSpec, storage_url: str
) -> tuple[StudySearch, Any, SearchSpace, int]:
    """Build the searcher, the scheduler, the space and the trial count of a sweep.

    The trial count is ``search.num_samples``, except for a grid: one trial per point.

    Raises:
        SearchSpaceError: the schedule space has no valid point for some choice.
    """
    space = SearchSpace.from_spec(spec)
    num_samples = int(spec.search.num_samples)
    if space.grid:
        grid = space.grid_size()
        if grid != num_samples:
            logger.info("sweep %s: grid search runs its %d points (search.num_samples %d "
                        "is ignored)", spec.name, grid, num_samples)
        num_samples = grid

    metrics = spec.objective.metric_list()
    modes = spec.objective.mode_list()
    multi = len(metrics) > 1
    sampler = make_sampler(
        spec.search.algorithm, seed=int(spec.search.seed), num_samples=num_samples,
        max_concurrent=int(spec.search.max_concurrent),
        grid_labels=space.grid_labels() if space.grid else None,
    )
    pruner = None if multi else make_pruner(
        spec.pruner, epochs=int(spec.training.epochs), n_datasets=len(spec.datasets),
        num_samples=num_samples,
    )
    searcher = StudySearch(
        space,
        metric=metrics if multi else "objective",
        mode=modes if multi else modes[0],
        sampler=sampler,
        study_name=spec.name,
        storage=open_study_storage(storage_url),
        pruner=pruner,
    )
    scheduler = make_scheduler(spec, searcher)
    return searcher, scheduler, space, num_samples


def make_trainable(
    spec: SweepSpec, run_context: dict[str, str] | None, trainable: Trainable | None = None
) -> Any:
    """Wrap the trainable with the sweep, the tracking context and the trial resources.

    Args:
        spec: the sweep (passed to the trainable as ``sweep``, a JSON-ready dict).
        run_context: MLflow ids for the trial runs, or None without tracking.
        trainable: a function with the signature of `workers.trainable.train_trial`;
            None imports that one (lazily: the driver never imports torch models itself).
    """
    from ray import tune

    if trainable is None:
        from workers.trainable import train_trial

        trainable = train_trial
    wrapped = tune.with_parameters(
        trainable, sweep=spec.model_dump(mode="json"), run_context=run_context
    )
    resources = {"cpu": float(spec.resources.cpu), "gpu": float(spec.resources.gpu)}
    return tune.with_resources(wrapped, resources)


# --------------------------------------------------------------------------------------
# Run and resume
# --------------------------------------------------------------------------------------


def run_sweep(
    spec: SweepSpec,
    *,
    sweep_file_text: str | None = None,
    address: str | None = None,
    trainable: Trainable | None = None,
    progress: ProgressSink | None = None,
    track: bool = True,
    verbose: bool = False,
) -> SweepOutcome:
    """Run a new sweep to the end (or until interrupted) and return its outcome.

    Args:
        spec: the validated sweep.
        sweep_file_text: the sweep file as the user wrote it, logged to MLflow; default:
            the resolved sweep (`dump_sweep`), which ``resume`` also uses.
        address: Ray cluster address (see `connect_ray`); None for local or ``RAY_ADDRESS``.
        trainable: replaces `workers.trainable.train_trial` (tests, custom trainers).
        progress: receives a `ProgressEvent` per trial result and trial end.
        track: record the sweep in MLflow (``tracking`` section); False skips MLflow.
        verbose: forward the trials' log lines to this process.

    Raises:
        SweepError: the experiment folder already contains a sweep, or Ray is unreachable.
        SearchSpaceError: the schedule space has no valid point for some choice.
        SweepValidationError: a trial needs more CPUs or GPUs than any node has.
        TrackingUnavailableError: the MLflow tracking server cannot be reached.
    """
    from ray import tune

    location = locate_sweep(spec.storage, spec.name)
    if tune.Tuner.can_restore(location.tune_experiment_path(),
                              storage_filesystem=location.filesystem()):
        raise SweepError(
            f"{location.experiment_uri} already contains sweep {spec.name!r}. Continue it "
            f"with `mmts-search resume {location.experiment_uri}`, or change `name` or "
            "`storage` to start a new one."
        )
    SearchSpace.from_spec(spec)

    sweep_text = dump_sweep(spec)
    location.state_dir.mkdir(parents=True, exist_ok=True)
    _set_aside_stale_state(location)
    (location.state_dir / SWEEP_FILE).write_text(sweep_text, encoding="utf-8")
    location.upload_state((SWEEP_FILE,))
    logger.info("sweep %s: experiment folder %s", spec.name, location.experiment_uri)

    return _execute(spec, location, sweep_file_text or sweep_text, resume=False,
                    address=address, trainable=trainable, progress=progress, track=track,
                    verbose=verbose)


def _set_aside_stale_state(location: SweepLocation) -> None:
    """Rename state files left by an earlier sweep that never reached Tune's first save.

    Such files (an Optuna study, an MLflow parent run id) would otherwise be picked up by
    this new sweep. They are renamed, not deleted, so nothing recorded is lost.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for filename in STATE_FILES:
        path = location.state_dir / filename
        if path.exists():
            stale = path.with_name(f"{filename}.stale-{stamp}")
            path.rename(stale)
            logger.warning("sweep %s: %s is left from an earlier sweep that did not start; "
                           "renamed it to %s", location.name, path, stale.name)


def resume_sweep(
    path: str,
    *,
    address: str | None = None,
    trainable: Trainable | None = None,
    progress: ProgressSink | None = None,
    track: bool = True,
    verbose: bool = False,
) -> SweepOutcome:
    """Continue the interrupted sweep whose experiment folder is ``path``.

    The sweep file is the ``sweep.yaml`` saved at the start, so overrides given to
    ``run`` still hold. The Optuna study and the MLflow parent run continue.

    Raises:
        SweepError: ``path`` contains no sweep that Tune can restore.
    """
    location = locate_existing_sweep(path)
    location.download_missing_state()
    try:
        sweep_text = location.read_text(SWEEP_FILE)
    except FileNotFoundError as exc:
        raise SweepError(f"{path} is not a sweep folder: {exc}. Pass the folder "
                         "<storage>/<name> that `mmts-search run` printed.") from exc
    spec = parse_sweep(sweep_text, source=f"{location.experiment_uri}/{SWEEP_FILE}")
    return _execute(spec, location, sweep_text, resume=True, address=address,
                    trainable=trainable, progress=progress, track=track, verbose=verbose)


def _execute(
    spec: SweepSpec,
    location: SweepLocation,
    sweep_text: str,
    *,
    resume: bool,
    address: str | None,
    trainable: Trainable | None,
    progress: ProgressSink | None,
    track: bool,
    verbose: bool,
) -> SweepOutcome:
    import ray

    # Trials run in the driver's working folder, not in their trial folders, so that
    # relative paths of the sweep (sqlite:///mlflow.db, dataset folders) mean the same
    # thing in the driver and in the trials. Tune forwards this variable to the trials.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Tune's console output: the legacy reporter is silent at verbose=0, where the new
    # one still prints a configuration box; progress goes through `ProgressCallback`.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Each epoch checkpoints, and keeping CHECKPOINTS_TO_KEEP forces an experiment
    # snapshot after that many; fast epochs make Tune warn about it on every trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    started_ray = connect_ray(address, verbose=verbose)
    sweep_run = None
    try:
        check_cluster_resources(spec)
        if track:
            sweep_run = _open_tracking(spec, location, sweep_text, resume=resume)
        run_context = sweep_run.run_context if sweep_run is not None else None
        tuner, searcher, num_samples, already_ended = _make_tuner(
            spec, location, resume=resume, trainable=make_trainable(spec, run_context, trainable)
        )

        ledger = TrialLedger()
        callbacks: list[Any] = [ledger, ProgressCallback(
            progress, mode=spec.objective.mode_list()[0], max_epochs=int(spec.training.epochs),
            total=num_samples, pruned_lookup=searcher.pruned_epoch, already_ended=already_ended,
        )]
        if sweep_run is not None:
            callbacks.append(sweep_run.tune_callback(searcher.pruned_epoch))
        _attach_callbacks(tuner, callbacks)

        logger.info("sweep %s: %s %d trials (%s, pruner %s), study %s", spec.name,
                    "resuming" if resume else "starting", num_samples, spec.search.algorithm,
                    spec.pruner.kind, _redact(study_storage_url(spec, location)))
        start = time.monotonic()
        results = tuner.fit()
        wall_s = time.monotonic() - start

        outcome = _summarize(spec, location, results, searcher, ledger, num_samples, wall_s)
        if sweep_run is not None:
            outcome.tracking_uri = sweep_run.run_context.get("tracking_uri")
            outcome.parent_run_id = sweep_run.run_context.get("parent_run_id")
            if outcome.finished:
                best_text = outcome.best_yaml.read_text(encoding="utf-8") \
                    if outcome.best_yaml else ""
                sweep_run.finalize(outcome.leaderboard, searcher.study, best_text)
            sweep_run.close("FINISHED" if outcome.finished else "KILLED")
            sweep_run = None
        location.upload_state()
        return outcome
    except BaseException:
        if sweep_run is not None:
            sweep_run.close("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _open_tracking(spec: SweepSpec, location: SweepLocation, sweep_text: str,
                   *, resume: bool) -> Any:
    from mmts_search.tracking import SweepRun

    space: dict[str, dict[str, Any]] = {}
    for family, name, domain in SearchSpace.from_spec(spec).describe():
        entry = space.setdefault(family, {})
        if name == "constraint":
            entry.setdefault("constraints", []).append(domain)
        else:
            entry[name] = domain
    return SweepRun.open(spec, sweep_dir=location.state_dir, sweep_file_text=sweep_text,
                         resume=resume, search_space=space)


def _make_tuner(
    spec: SweepSpec, location: SweepLocation, *, resume: bool, trainable: Any
) -> tuple[Any, StudySearch, int, int]:
    """Return the tuner, its searcher, the trial count and the trials already ended."""
    from ray import tune

    filesystem = location.filesystem()
    if resume:
        path = location.tune_experiment_path()
        if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            raise SweepError(f"{location.experiment_uri} contains no Tune experiment state "
                             "(tuner.pkl) to resume; start the sweep with `mmts-search run`")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=filesystem)
        # NOTE: Tuner.restore offers no public getter for the restored TuneConfig (Ray
        # 2.60); `_local_tuner` is the only way to reach the searcher it unpickled.
        tune_config = tuner._local_tuner._tune_config  # type: ignore[union-attr]
        searcher = cast(StudySearch, tune_config.search_alg)
        already_ended = _count_ended(tuner)
        return tuner, searcher, int(tune_config.num_samples), already_ended

    searcher, scheduler, _, num_samples = build_search(spec, study_storage_url(spec, location))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=int(spec.search.max_concurrent),
            # A new worker process per trial costs seconds of imports (torch, MLflow) and
            # data loading; reused processes start the next trial in under a second. The
            # trainable seeds, sets its threads and opens its MLflow run on every start.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=location.tune_storage_path(),
            storage_filesystem=filesystem,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=int(spec.search.max_failures)),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
    )
    return tuner, searcher, num_samples, 0


def _attach_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    # NOTE: the callbacks are set after the Tuner is built (Ray 2.60 internals), so they
    # stay out of tuner.pkl. They hold a console and MLflow clients, and a resumed sweep
    # needs fresh ones rather than the unpickled callbacks of the old driver.
    tuner._local_tuner._run_config.callbacks = callbacks


def _count_ended(tuner: Any) -> int:
    try:
        results = tuner.get_results()
    except (RuntimeError, ValueError):
        return 0
    return int(results.num_terminated + results.num_errors)


def _summarize(
    spec: SweepSpec,
    location: SweepLocation,
    results: Any,
    searcher: StudySearch,
    ledger: TrialLedger,
    num_samples: int,
    wall_s: float,
) -> SweepOutcome:
    metrics = spec.objective.metric_list()
    modes = spec.objective.mode_list()
    leaderboard = build_leaderboard(results, searcher=searcher, metrics=metrics, modes=modes,
                                    ledger=ledger)
    ended = int(results.num_terminated + results.num_errors)
    finished = ended >= num_samples
    outcome = SweepOutcome(
        name=spec.name,
        experiment_uri=location.experiment_uri,
        state_dir=location.state_dir,
        leaderboard=leaderboard,
        finished=finished,
        num_samples=num_samples,
        wall_s=wall_s,
        study_storage=study_storage_url(spec, location),
        metrics=metrics,
    )
    if len(metrics) > 1 and "pareto" in leaderboard:
        outcome.pareto = leaderboard[leaderboard["pareto"]].reset_index(drop=True)

    row = best_row(leaderboard)
    if row is not None:
        params = json.loads(row["params"])
        outcome.best = {"trial_id": row["trial_id"], "family": row["family"],
                        "params": params, "objective": float(row["objective"])}
        best_spec = trial_spec(spec, row["family"], params)
        comment = (f"Best trial {row['trial_id']} of sweep {spec.name}: "
                   f"objective {row['objective']:.6g}. Run it with `mmts-search trial`.")
        outcome.best_yaml = location.state_dir / "best.yaml"
        outcome.best_yaml.write_text(dump_sweep(best_spec, comment=comment), encoding="utf-8")

    counts = leaderboard["status"].value_counts().to_dict() if not leaderboard.empty else {}
    logger.info("sweep %s: %s after %.1f s, trials by status %s", spec.name,
                "finished" if finished else f"interrupted ({ended}/{num_samples} ended)",
                wall_s, counts)
    return outcome


def _redact(text: str) -> str:
    from mmts_search.tracking import redact

    return redact(text)
