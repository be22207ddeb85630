"""The parent run of a sweep, written from the driver."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException

from mmts_search.tracking._secrets import (
    flatten_params,
    redact,
    sanitize_key,
    tag_value,
)
from mmts_search.tracking._store import (
    ROLE_PARENT,
    TAG_ERROR,
    TAG_INTERRUPTED,
    TAG_OBJECTIVE_METRIC,
    TAG_OBJECTIVE_MODE,
    TAG_PRUNED,
    TAG_PRUNED_EPOCH,
    TAG_ROLE,
    TAG_RUN_NAME,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    call_with_retry,
    child_runs,
    log_params_once,
    log_tags,
    preflight,
    resolve_tracking_uri,
    sqlite_path,
)
from mmts_search.tracking.plots import GROUP_COLUMNS, plot_head_mid_tail, write_optuna_plots
from mmts_search.tracking.report import (
    best_per_family,
    normalize_leaderboard,
    sort_leaderboard,
)
from mmts_search.tracking.trial import MODEL_ARTIFACT_DIR, serialize

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from ray.tune import Callback

logger = logging.getLogger(__name__)

PARENT_STATE_FILE = "mlflow_parent.json"
VERSIONED_PACKAGES = ("mmts-search", "torch", "ray", "optuna", "mlflow")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> tuple[str, bool] | None:
    """Return (commit, dirty) of the git checkout holding this package, or None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip(), bool(status.stdout.strip())


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Return the id of experiment ``name``, creating it when absent.

    With a SQLite URI a new experiment stores its artifacts in ``mlruns/<id>`` next to
    the database file (an absolute path), not under the working directory of whichever
    process created it.

    Raises:
        ValueError: when the experiment exists but is deleted.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment {name!r} (id {found.experiment_id}) is deleted; restore it "
                f"with `mlflow experiments restore --experiment-id {found.experiment_id}` "
                "or set another tracking.experiment")
        return found.experiment_id

    database = sqlite_path(uri)
    try:
        if database is not None:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(uri, str(database.parent / "mlruns"))
            experiment_id = store.create_experiment(name)
        else:
            experiment_id = client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another driver created it between the lookup and the creation.
        created = client.get_experiment_by_name(name)
        if created is None:
            raise
        return created.experiment_id
    logger.info("created MLflow experiment %r (id %s) at %s", name, experiment_id, redact(uri))
    return experiment_id


def _default_search_space(spec: Any) -> dict[str, Any]:
    """Return the schedule families and each family's parameter ranges of ``spec``."""
    schedule = spec.schedule.model_dump(mode="json")
    families = list(schedule.get("families", []))
    try:
        from mmts_search.schedules import FAMILY_PARAMETERS
    except ImportError:
        return schedule
    return {
        "families": families,
        "parameters": {
            family: {name: schedule.get(name) for name in FAMILY_PARAMETERS.get(family, ())}
            for family in families
        },
    }


class SweepRun:
    """The MLflow parent run of one sweep; trials are its child runs.

    Made by `SweepRun.open` (driver start or resume) or `SweepRun.attach` (an existing
    parent, for example inside the Tune callback).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        run_id: str,
        sweep_name: str,
        objective_mode: str = "max",
        register_model: str | None = None,
        budget_s: float = 30.0,
    ) -> None:
        self._uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id = experiment_id
        self._run_id = run_id
        self._sweep_name = sweep_name
        self._objective_mode = objective_mode
        self._register_model = register_model
        self._budget_s = budget_s

    # ------------------------------------------------------------------ creation

    @classmethod
    def open(
        cls,
        spec: Any,
        *,
        sweep_dir: Path | str,
        sweep_file_text: str,
        resume: bool,
        dataset_fingerprints: Mapping[str, str] | None = None,
        search_space: Mapping[str, Any] | None = None,
        base_dir: Path | str | None = None,
        check: bool = True,
    ) -> SweepRun:
        """Open the parent run of a sweep, or reuse it when ``resume`` is True.

        Runs `preflight` first. The whole sweep is logged as flattened params (redacted,
        in batches of 100). The sweep file and the validated sweep become YAML artifacts
        and the search space a JSON artifact. Tags record the sweep name, the objective,
        the git commit of this package when known, and the versions of torch, ray, optuna
        and mlflow. The parent run id is saved in ``sweep_dir/mlflow_parent.json`` for a
        resume.

        Args:
            spec: the validated `SweepSpec`.
            sweep_dir: the sweep's results folder.
            sweep_file_text: the sweep file as the user wrote it.
            resume: reuse the parent run saved in ``sweep_dir`` when it exists.
            dataset_fingerprints: dataset file to SHA-256, also settable later with
                `log_dataset_fingerprints`.
            search_space: the resolved search space; default: the schedule families of
                ``spec`` with their parameter ranges.
            base_dir: directory for a relative tracking URI (default: working directory).
            check: run `preflight` (tests may skip it).

        Raises:
            TrackingUnavailableError: when the tracking or artifact store is unreachable.
        """
        sweep_dir = Path(sweep_dir)
        uri = resolve_tracking_uri(spec.tracking.uri, base_dir or Path.cwd())
        experiment = spec.tracking.experiment
        if check:
            preflight(uri, experiment=experiment)

        client = MlflowClient(tracking_uri=uri)
        experiment_id = call_with_retry(lambda: get_or_create_experiment(client, uri, experiment),
                                        budget_s=30, description="creating the experiment")
        mode = spec.objective.mode
        mode_text = ",".join(mode) if isinstance(mode, (list, tuple)) else str(mode)
        metric = spec.objective.metric
        metric_text = ",".join(metric) if isinstance(metric, (list, tuple)) else str(metric)

        saved_run_id = cls._saved_parent(client, sweep_dir, experiment_id) if resume else None
        if saved_run_id is not None:
            run_id = saved_run_id
            call_with_retry(lambda: client.update_run(run_id, status="RUNNING"), budget_s=30)
            logger.info("sweep %s: resuming MLflow parent run %s", spec.name, run_id)
        else:
            run = call_with_retry(
                lambda: client.create_run(
                    experiment_id, run_name=spec.name,
                    tags={TAG_ROLE: ROLE_PARENT, TAG_SWEEP: spec.name}),
                budget_s=30, description="creating the parent run")
            run_id = run.info.run_id
            logger.info("sweep %s: created MLflow parent run %s in experiment %s at %s",
                        spec.name, run_id, experiment_id, redact(uri))

        sweep = cls(tracking_uri=uri, experiment_id=experiment_id, run_id=run_id,
                    sweep_name=spec.name, objective_mode=mode_text.split(",")[0],
                    register_model=spec.tracking.register_model)
        sweep._write_state(sweep_dir, experiment)

        tags = {
            TAG_RUN_NAME: spec.name,
            TAG_OBJECTIVE_METRIC: metric_text,
            TAG_OBJECTIVE_MODE: mode_text,
            "mmts.tracking_uri": redact(uri),
            **{f"mmts.version.{name}": _package_version(name) for name in VERSIONED_PACKAGES},
        }
        commit = _git_commit()
        if commit is not None:
            tags["mmts.git_commit"] = commit[0]
            tags["mmts.git_dirty"] = "true" if commit[1] else "false"
        sweep._call(lambda: log_tags(client, run_id, {k: tag_value(v) for k, v in tags.items()}))

        sweep_dump = spec.model_dump(mode="json")
        sweep._call(lambda: log_params_once(client, run_id, flatten_params(sweep_dump)))
        with tempfile.TemporaryDirectory(prefix="mmts-sweep-") as tmp:
            folder = Path(tmp)
            (folder / "sweep.yaml").write_text(redact(sweep_file_text), encoding="utf-8")
            (folder / "resolved_sweep.yaml").write_text(
                redact(serialize(sweep_dump, "resolved_sweep.yaml")), encoding="utf-8")
            space = dict(search_space) if search_space is not None else \
                _default_search_space(spec)
            (folder / "search_space.json").write_text(
                redact(serialize(space, "search_space.json")), encoding="utf-8")
            sweep._call(lambda: client.log_artifacts(run_id, str(folder), "sweep"))

        if dataset_fingerprints:
            sweep.log_dataset_fingerprints(dataset_fingerprints)
        return sweep

    @classmethod
    def attach(cls, run_context: Mapping[str, str], **kwargs: Any) -> SweepRun:
        """Return the SweepRun of an existing parent run, from a `run_context` dict."""
        return cls(tracking_uri=run_context["tracking_uri"],
                   experiment_id=run_context["experiment_id"],
                   run_id=run_context["parent_run_id"],
                   sweep_name=run_context.get("sweep_name", ""), **kwargs)

    @staticmethod
    def _saved_parent(client: MlflowClient, sweep_dir: Path, experiment_id: str) -> str | None:
        state_file = sweep_dir / PARENT_STATE_FILE
        if not state_file.exists():
            logger.info("no %s in %s; a new parent run is created", PARENT_STATE_FILE,
                        sweep_dir)
            return None
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            run = call_with_retry(lambda: client.get_run(state["run_id"]), budget_s=30)
        except (ValueError, KeyError, MlflowException) as error:
            logger.warning("cannot reuse the parent run saved in %s (%s); a new one is "
                           "created", state_file, redact(error))
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage == "deleted":
            logger.warning("parent run %s saved in %s belongs to another experiment or is "
                           "deleted; a new one is created", run.info.run_id, state_file)
            return None
        return run.info.run_id

    def _write_state(self, sweep_dir: Path, experiment: str) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "run_id": self._run_id,
            "experiment_id": self._experiment_id,
            "experiment": experiment,
            "sweep_name": self._sweep_name,
            "tracking_uri": redact(self._uri),
        }
        (sweep_dir / PARENT_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n",
                                                   encoding="utf-8")

    def _call(self, call: Callable[[], Any], description: str = "MLflow call") -> Any:
        return call_with_retry(call, budget_s=self._budget_s, request_timeout_s=30.0,
                               description=description)

    # ------------------------------------------------------------------ properties

    @property
    def run_id(self) -> str:
        """The parent run id."""
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id."""
        return self._experiment_id

    @property
    def tracking_uri(self) -> str:
        """The absolute tracking URI (may hold credentials: never log it unredacted)."""
        return self._uri

    @property
    def run_context(self) -> dict[str, str]:
        """What workers need to open child runs: pass it to `open_trial_run`."""
        return {
            "tracking_uri": self._uri,
            "experiment_id": self._experiment_id,
            "parent_run_id": self._run_id,
            "sweep_name": self._sweep_name,
        }

    # ------------------------------------------------------------------ driver API

    def log_dataset_fingerprints(self, fingerprints: Mapping[str, str]) -> None:
        """Record the SHA-256 of every dataset file as tags and as ``sweep/datasets.json``.

        Args:
            fingerprints: dataset file (path or URL) to its hex SHA-256.
        """
        redacted = {redact(path): str(digest) for path, digest in fingerprints.items()}
        tags = {sanitize_key(f"mmts.dataset_sha256.{path}"): digest
                for path, digest in redacted.items()}
        self._call(lambda: log_tags(self._client, self._run_id, tags))
        self._call(lambda: self._client.log_dict(self._run_id, redacted,
                                                 "sweep/datasets.json"))

    def tune_callback(self, pruned_lookup: Callable[[str], int | None]) -> Callback:
        """Return a Ray Tune callback that ends each trial's child run with its state.

        Pruned trials (``pruned_lookup(trial_id)`` returns the epoch) end KILLED with
        tags ``pruned=true`` and ``pruned_epoch``. Errored trials end FAILED with the
        error in the ``error`` tag. Complete trials still RUNNING end FINISHED. The
        callback is pickled with the Tune experiment, so ``pruned_lookup`` must be
        picklable.
        """
        from mmts_search.tracking.tune import MlflowTrialStatusCallback

        return MlflowTrialStatusCallback(self.run_context, pruned_lookup)

    def end_trial(
        self,
        trial_id: str,
        *,
        pruned_epoch: int | None = None,
        error: str | None = None,
    ) -> str | None:
        """End a trial's child run as FAILED (``error``), KILLED (pruned) or FINISHED.

        A run that the worker already ended keeps its status unless the trial was
        pruned or failed. Used by the Tune callback; an in-process driver calls it
        directly.

        Returns:
            The status set, or None when the trial has no child run or nothing changed.
        """
        runs = self._call(lambda: child_runs(self._client, self._experiment_id, self._run_id,
                                             trial_id=trial_id))
        if not runs:
            logger.info("sweep %s: trial %s has no MLflow child run (it may have failed "
                        "before opening it)", self._sweep_name, trial_id)
            return None
        run = runs[0]
        run_id = run.info.run_id

        if error is not None:
            status, tags = "FAILED", {TAG_ERROR: tag_value(error)}
        elif pruned_epoch is not None:
            status, tags = "KILLED", {TAG_PRUNED: "true", TAG_PRUNED_EPOCH: str(pruned_epoch)}
        elif run.info.status == "RUNNING":
            status, tags = "FINISHED", {}
        else:
            return None

        if tags:
            self._call(lambda: log_tags(self._client, run_id, tags))
        self._call(lambda: self._client.set_terminated(run_id, status))
        logger.info("sweep %s: trial %s run %s ended %s%s", self._sweep_name, trial_id, run_id,
                    status, f" (pruned at epoch {pruned_epoch})" if pruned_epoch is not None
                    else "")
        return status

    def close_dangling_children(self) -> list[str]:
        """End every child run still RUNNING as KILLED with tag ``mmts.interrupted=true``.

        The driver calls this when it resumes a sweep (runs of the interrupted driver)
        and when the sweep ends, so that no run stays RUNNING.

        Returns:
            The ids of the runs that were ended.
        """
        runs = self._call(lambda: child_runs(self._client, self._experiment_id, self._run_id,
                                             status="RUNNING"))
        closed = []
        for run in runs:
            self._interrupt(run.info.run_id)
            closed.append(run.info.run_id)
        if closed:
            logger.info("sweep %s: ended %d dangling child runs as KILLED: %s",
                        self._sweep_name, len(closed), closed)
        return closed

    def _interrupt(self, run_id: str) -> None:
        self._call(lambda: log_tags(self._client, run_id, {TAG_INTERRUPTED: "true"}))
        self._call(lambda: self._client.set_terminated(run_id, "KILLED"))

    def finalize(
        self,
        leaderboard: pd.DataFrame,
        study: optuna.Study | None,
        best_spec_yaml: str,
        *,
        include_plotlyjs: str | bool = "cdn",
    ) -> dict[str, str]:
        """Log the sweep's results on the parent run.

        Artifacts: ``leaderboard.csv`` (best first), ``best_per_family.csv``,
        ``best_config.yaml``, ``plots/optuna_<plot>.html`` and ``.png`` (see
        `write_optuna_plots`), and ``plots/head_mid_tail_rsum.png`` (the best trial of
        each family). Tags ``mmts.best_trial_id`` and ``mmts.best_family`` and the metric
        ``best_objective`` mark the winner. With ``tracking.register_model`` set, the
        best trial's ``model/`` artifact is registered. What cannot be made (a plot the
        study does not support, a missing column) is skipped with a warning.

        Args:
            leaderboard: one row per trial; see `normalize_leaderboard` for the columns.
            study: the Optuna study, or None when the sweep did not use Optuna.
            best_spec_yaml: the best configuration as a sweep file (`trial_spec` dumped).
            include_plotlyjs: see `write_optuna_plots`.

        Returns:
            Artifact path to ``"logged"``, or to the reason it was skipped.
        """
        results: dict[str, str] = {}
        table = sort_leaderboard(normalize_leaderboard(leaderboard), mode=self._objective_mode)
        best = best_per_family(table, mode=self._objective_mode)

        with tempfile.TemporaryDirectory(prefix="mmts-finalize-") as tmp:
            folder = Path(tmp)
            plots = folder / "plots"
            plots.mkdir()
            (folder / "leaderboard.csv").write_text(redact(table.to_csv(index=False)),
                                                    encoding="utf-8")
            (folder / "best_per_family.csv").write_text(redact(best.to_csv(index=False)),
                                                        encoding="utf-8")
            (folder / "best_config.yaml").write_text(redact(best_spec_yaml), encoding="utf-8")

            skipped: list[str] = []
            if study is not None:
                _, skipped = write_optuna_plots(study, plots, include_plotlyjs=include_plotlyjs)
            else:
                skipped.append("optuna plots: skipped, no Optuna study")

            chart_rows = best.dropna(subset=list(GROUP_COLUMNS))
            if chart_rows.empty:
                skipped.append("head/mid/tail chart: skipped, no trial reported "
                               "head_rsum, mid_rsum and tail_rsum")
            else:
                figure = plot_head_mid_tail(chart_rows, title=f"{self._sweep_name}: head / "
                                            "mid / tail rsum of the best trial per family")
                figure.savefig(plots / "head_mid_tail_rsum.png", dpi=120, bbox_inches="tight")

            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    results[path.relative_to(folder).as_posix()] = "logged"
            self._call(lambda: self._client.log_artifacts(self._run_id, str(folder)),
                       "uploading the sweep results")

        for reason in skipped:
            results[reason.split(":")[0]] = reason
            logger.warning("sweep %s: %s", self._sweep_name, reason)

        self._log_summary(table, best)
        if self._register_model and not best.empty:
            version = self.register_best_model(self._register_model,
                                               trial_id=str(best.iloc[0]["trial_id"]))
            results["model registry"] = (f"registered {self._register_model} version {version}"
                                         if version else "skipped, see the warning")
        return results

    def _log_summary(self, table: pd.DataFrame, best: pd.DataFrame) -> None:
        tags: dict[str, str] = {}
        metrics: list[Metric] = []
        timestamp = int(time.time() * 1000)
        for state, count in table["status"].value_counts().items():
            metrics.append(Metric(f"trials_{str(state).lower()}", float(count), timestamp, 0))
        if not best.empty:
            winner = best.iloc[0]
            tags = {"mmts.best_trial_id": str(winner["trial_id"]),
                    "mmts.best_family": str(winner["family"])}
            metrics.append(Metric("best_objective", float(winner["objective"]), timestamp, 0))
        self._call(lambda: self._client.log_batch(self._run_id, metrics=metrics))
        if tags:
            self._call(lambda: log_tags(self._client, self._run_id, tags))

    def register_best_model(self, name: str, *, trial_id: str) -> str | None:
        """Register the ``model/`` artifact of a trial's child run in the model registry.

        The version's source is ``runs:/<child run id>/model`` (the safetensors weights
        written by `TrialRun.log_state_dict`). Works with SQLite and HTTP tracking stores.

        Returns:
            The new version, or None (with a warning) when the trial logged no model.
        """
        runs = self._call(lambda: child_runs(self._client, self._experiment_id, self._run_id,
                                             trial_id=trial_id))
        if not runs:
            logger.warning("sweep %s: cannot register a model, trial %s has no child run",
                           self._sweep_name, trial_id)
            return None
        run_id = runs[0].info.run_id
        files = self._call(lambda: self._client.list_artifacts(run_id, MODEL_ARTIFACT_DIR))
        if not files:
            logger.warning("sweep %s: best trial %s (run %s) logged no model; set "
                           "training.save_model (or tracking.log_model) to true to register "
                           "it", self._sweep_name, trial_id, run_id)
            return None

        try:
            self._call(lambda: self._client.create_registered_model(name))
        except RestException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self._call(lambda: self._client.create_model_version(
            name, source=f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}", run_id=run_id,
            tags={TAG_SWEEP: self._sweep_name, TAG_TRIAL_ID: trial_id},
            description=f"best trial {trial_id} of sweep {self._sweep_name}"))
        self._call(lambda: log_tags(self._client, self._run_id,
                                    {"mmts.registered_model": f"{name}/{version.version}"}))
        logger.info("sweep %s: registered %s version %s from run %s", self._sweep_name, name,
                    version.version, run_id)
        return str(version.version)

    def close(self, status: str = "FINISHED") -> None:
        """End dangling child runs (KILLED), then the parent run with ``status``."""
        self.close_dangling_children()
        self._call(lambda: self._client.set_terminated(self._run_id, status.upper()))
        logger.info("sweep %s: MLflow parent run %s ended %s", self._sweep_name, self._run_id,
                    status.upper())
