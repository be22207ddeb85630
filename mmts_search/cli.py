"""The ``mmts-search`` command: validate, run, resume and submit sweeps, and more.

Exit codes: 0 on success and 2 for an invalid sweep file or ``--set`` override, with every
problem listed by key path, value and message. Other user errors, such as an unreachable
server, exit with 1, and an interrupted sweep exits with 130 (resume it). User errors print a
message without a Python traceback; ``--verbose`` adds the log lines of the driver.

Heavy imports (Ray, Optuna, MLflow, torch) happen inside the commands, so that
``--help`` returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

EXIT_INVALID = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="mmts-search",
    help="Search temperature and margin schedules (MM-TS) for multi-modal contrastive "
         "learning on long-tail data, with Ray Tune, Optuna and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
jobs_app = typer.Typer(
    help="Inspect, follow and stop sweeps submitted to a Ray cluster with `submit`.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(jobs_app, name="jobs")

# Redirected output (a log file, a Ray job's log) gets wide lines instead of rich's 80
# columns, so that leaderboards stay readable there.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
error_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)

# Options shared by several commands.
SweepFileArg = Annotated[Path, typer.Argument(
    help="Sweep file (YAML), for example search_spaces/demo.yaml.", show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY.PATH=VALUE",
    help="Override one value of the sweep file, for example --set search.num_samples=4 "
         "or --set training.epochs=3. Repeat for several; values are YAML.",
    show_default=False)]
AddressOption = Annotated[str | None, typer.Option(
    "--address",
    help="Ray cluster to run on: GCS address host:6379 or 'auto'. Default: RAY_ADDRESS "
         "when set, else a local Ray instance with one CPU per core.",
    show_default=False)]
JobsAddressOption = Annotated[str, typer.Option(
    "--address", envvar="RAY_JOBS_ADDRESS",
    help="Ray Jobs API (dashboard) URL of the cluster, http://HEAD:8265. Default: the "
         "RAY_JOBS_ADDRESS variable.")]
VerboseOption = Annotated[bool, typer.Option(
    "--verbose", "-v",
    help="Show the driver's log lines (INFO) and forward the trials' output.")]
TopOption = Annotated[int, typer.Option(
    "--top", min=1, help="Number of trials shown in the final leaderboard.")]


# --------------------------------------------------------------------------------------
# Error handling and output helpers
# --------------------------------------------------------------------------------------


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        # MLflow sets up its own handler at import, at the level of this variable.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # Optuna's warnings about experimental features and small samples give a user
        # of the command nothing to act on.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"optuna(\.|$)")
        warnings.filterwarnings("ignore", message="Some regimes for parameter")
        warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(
        level=level, stream=sys.stderr, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Optuna logs every created study and trial at INFO through its own handler.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # MLflow logs its database migrations at INFO through a handler of its own.
    logging.getLogger("mlflow").setLevel(level)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    error_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _print_problems(title: str, problems: list[tuple[str, Any, str, int | None]]) -> None:
    error_console.print(f"[bold red]{escape(title)}[/] ({len(problems)} "
                        f"problem{'' if len(problems) == 1 else 's'}):")
    for path, value, message, line in problems:
        where = path or "(file)"
        if line is not None:
            where += f" (line {line})"
        error_console.print(f"  - {escape(where)}: value {escape(_show(value))}: "
                            f"{escape(message)}")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the expected errors of the commands into messages and exit codes."""
    from mmts_search.spec import SweepValidationError

    try:
        yield
    except SweepValidationError as exc:
        problems = [(p.path, p.value, p.message, p.line) for p in exc.problems]
        _print_problems(exc.title, problems)
        raise typer.Exit(EXIT_INVALID) from None
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 - mapped below, re-raised when unexpected
        _handle_other(exc)
        raise


def _handle_other(exc: Exception) -> None:
    """Exit with a message for known user errors; return for unexpected ones."""
    from mmts_search.search.space import SearchSpaceError

    if isinstance(exc, SearchSpaceError):
        _print_problems("Invalid search space",
                        [(path, value, message, None) for path, value, message in exc.problems])
        raise typer.Exit(EXIT_INVALID) from None

    names = {cls.__name__ for cls in type(exc).__mro__}
    known = {"SweepError", "SubmitError", "TrackingUnavailableError", "FileNotFoundError",
             "DataError", "PermissionError", "IsADirectoryError"}
    if names & known:
        _fail(str(exc))


def _table(frame: Any, columns: list[str], *, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for _, row in frame.iterrows():
        table.add_row(*(_cell(row.get(column)) for column in columns))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.4g}"
    return escape(str(value))


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------


@app.command()
def validate(
    file: SweepFileArg,
    overrides: SetOption = None,
) -> None:
    """Validate a sweep file and print the resolved search space.

    Exit code 0 when the file is valid, 2 with the list of problems (key path, value,
    message) when it is not.
    """
    _configure_logging(False)
    with _user_errors():
        from mmts_search.search.space import SearchSpace
        from mmts_search.spec import load_sweep

        spec = load_sweep(file, overrides or [])
        space = SearchSpace.from_spec(spec)

    table = Table(title=f"Search space of sweep {spec.name}")
    for column in ("family", "parameter", "values"):
        table.add_column(column)
    for family, name, domain in space.describe():
        table.add_row(family, name, escape(domain))
    console.print(table)

    metrics = ", ".join(spec.objective.metric_list())
    modes = ", ".join(spec.objective.mode_list())
    trials = (f"{space.grid_size()} (one per grid point)" if space.grid
              else str(spec.search.num_samples))
    console.print(
        f"search: {spec.search.algorithm}, {trials} trials, {spec.search.max_concurrent} at "
        f"once, seed {spec.search.seed}\n"
        f"pruner: {spec.pruner.kind} (grace {spec.pruner.grace_epochs} epochs)\n"
        f"objective: {escape(metrics)} ({modes}), {spec.objective.aggregate} over "
        f"{len(spec.datasets)} dataset(s)\n"
        f"training: {spec.training.epochs} epochs, loss {spec.loss}\n"
        f"resources per trial: {spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU\n"
        f"storage: {escape(spec.storage)}/{escape(spec.name)}"
    )
    console.print(f"[green]{escape(str(file))} is valid.[/]")


# --------------------------------------------------------------------------------------
# run and resume
# --------------------------------------------------------------------------------------


def _progress_printer() -> Callable[[Any], None]:
    def show(event: Any) -> None:
        objective = "-" if event.objective is None else f"{event.objective:.4g}"
        best = "-" if event.best_objective is None else \
            f"{event.best_objective:.4g} (trial {event.best_trial_id})"
        counter = f"[{event.ended:>{len(str(event.total))}}/{event.total}]"
        if event.kind == "result":
            console.print(f"{counter} trial {event.trial_id} epoch {event.epoch}/"
                          f"{event.max_epochs} objective {objective}  best {escape(best)}")
            return
        style = {"complete": "green", "pruned": "yellow", "failed": "red"}[event.kind]
        params = ", ".join(f"{k}={_cell(v)}" for k, v in event.config.items() if k != "family")
        detail = f" ({escape(event.message)})" if event.message else ""
        console.print(f"{counter} trial {event.trial_id} [{style}]{event.kind.upper()}[/]"
                      f"{detail} after epoch {event.epoch}: {event.config.get('family')} "
                      f"{escape(params)}, objective {objective}  best {escape(best)}")

    return show


def _print_outcome(outcome: Any, *, top: int) -> None:
    from mmts_search.tracking import redact

    board = outcome.leaderboard.copy()
    if not board.empty:
        board["params"] = board["params"].map(_short_params)
        columns = ["trial_id", "family", "params", "objective", "status", "epochs",
                   "head_rsum", "mid_rsum", "tail_rsum", "rsum"]
        console.print(_table(board.head(top), columns,
                             title=f"Top {min(top, len(board))} of {len(board)} trials"))
    if not outcome.pareto.empty:
        pareto = outcome.pareto.copy()
        pareto["params"] = pareto["params"].map(_short_params)
        columns = ["trial_id", "family", "params", *outcome.metrics]
        console.print(_table(pareto, columns, title="Pareto front (trials no other trial "
                                                    "beats on every objective)"))

    if not outcome.finished:
        console.print(f"[yellow]Sweep {outcome.name} stopped before all {outcome.num_samples}"
                      f" trials ended.[/] Continue it with:\n"
                      f"  mmts-search resume {escape(outcome.experiment_uri)}")
    if outcome.best_yaml is not None:
        console.print(f"Best configuration: {escape(str(outcome.best_yaml))} "
                      f"(objective {outcome.best['objective']:.4g}, trial "
                      f"{outcome.best['trial_id']})\n"
                      f"  run it again: mmts-search trial {escape(str(outcome.best_yaml))}")
    elif outcome.finished:
        console.print("[red]No trial completed[/]: see the FAILED rows and the trial logs.")

    console.print(f"Results: {escape(outcome.experiment_uri)} ({outcome.wall_s:.0f} s)")
    console.print("Browse them with:")
    if outcome.tracking_uri:
        uri = redact(outcome.tracking_uri)
        if uri.startswith(("http://", "https://")):
            console.print(f"  MLflow:  open {escape(uri)}")
        else:
            console.print(f"  mlflow ui --backend-store-uri {escape(uri)}")
    console.print(f"  optuna-dashboard {escape(redact(outcome.study_storage))}")


def _short_params(params_json: str) -> str:
    params = json.loads(params_json) if params_json else {}
    return ", ".join(f"{name}={_cell(value)}" for name, value in params.items())


def _run_and_report(call: Callable[..., Any], *, top: int, **kwargs: Any) -> None:
    with _user_errors():
        outcome = call(progress=_progress_printer(), **kwargs)
    _print_outcome(outcome, top=top)
    if not outcome.finished:
        raise typer.Exit(EXIT_INTERRUPTED)
    if outcome.best_yaml is None:
        # Every trial failed or diverged: scripts and CI must not read this as success.
        raise typer.Exit(1)


@app.command()
def run(
    file: SweepFileArg,
    overrides: SetOption = None,
    address: AddressOption = None,
    top: TopOption = 10,
    verbose: VerboseOption = False,
) -> None:
    """Run a sweep: validate the file, run every trial, print the leaderboard.

    Prints one line per trial result with the best objective so far. At the end it
    writes the best configuration to <storage>/<name>/best.yaml (a file that `trial`
    runs) and prints the commands that browse the results in MLflow and
    optuna-dashboard. Interrupt with Ctrl-C and continue with `resume`.
    """
    _configure_logging(verbose)
    with _user_errors():
        from mmts_search.search.driver import run_sweep
        from mmts_search.spec import load_sweep

        spec = load_sweep(file, overrides or [])
        sweep_file_text = file.read_text(encoding="utf-8")
    families = ", ".join(spec.schedule.families)
    console.print(f"Sweep [bold]{escape(spec.name)}[/]: {spec.search.algorithm} over "
                  f"{escape(families)}, pruner {spec.pruner.kind}, objective "
                  f"{escape(', '.join(spec.objective.metric_list()))}")
    _run_and_report(run_sweep, top=top, spec=spec, sweep_file_text=sweep_file_text,
                    address=address, verbose=verbose)


@app.command()
def resume(
    path: Annotated[str, typer.Argument(
        help="Experiment folder of the sweep, <storage>/<name> (a local folder or "
             "s3://bucket/prefix/name), as printed by `run`.", show_default=False)],
    address: AddressOption = None,
    top: TopOption = 10,
    verbose: VerboseOption = False,
) -> None:
    """Continue an interrupted sweep from its experiment folder.

    Finished trials are kept, unfinished ones continue from their last checkpoints,
    and the Optuna study and the MLflow parent run continue. The total number of
    trials stays search.num_samples.
    """
    _configure_logging(verbose)
    from mmts_search.search.driver import resume_sweep

    console.print(f"Resuming sweep in {escape(path)}")
    _run_and_report(resume_sweep, top=top, path=path, address=address, verbose=verbose)


# --------------------------------------------------------------------------------------
# submit and jobs
# --------------------------------------------------------------------------------------


@app.command()
def submit(
    file: SweepFileArg,
    address: JobsAddressOption,
    overrides: SetOption = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the job's logs until it ends; exit 0 only if it succeeded.")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Submit a sweep to a Ray cluster through the Ray Jobs API and print the job id.

    The job runs `python -m mmts_search run sweep.yaml --address auto` on the cluster,
    with this installation's mmts_search and workers packages and the resolved sweep
    file. A cluster with token authentication gets the token from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """
    _configure_logging(verbose)
    with _user_errors():
        from mmts_search.search.submit import submission_warnings, submit_sweep
        from mmts_search.spec import load_sweep

        spec = load_sweep(file, overrides or [])
        for warning in submission_warnings(spec):
            error_console.print(f"[yellow]warning:[/] {escape(warning)}")
        job_id = submit_sweep(spec, address=address, verbose=verbose)

    console.print(f"Submitted sweep {escape(spec.name)} as job {job_id}")
    console.print(f"  status: mmts-search jobs status {job_id} --address {escape(address)}\n"
                  f"  logs:   mmts-search jobs logs {job_id} --follow --address "
                  f"{escape(address)}")
    if wait:
        _follow_and_exit(address, job_id)


def _follow_and_exit(address: str, job_id: str) -> None:
    from mmts_search.search.submit import follow_job_logs, wait_for_job

    with _user_errors():
        follow_job_logs(address, job_id, lambda text: console.out(text, end=""))
        state = wait_for_job(address, job_id)
    _print_state(state)
    if state.status != "SUCCEEDED":
        raise typer.Exit(EXIT_ERROR)


def _print_state(state: Any) -> None:
    style = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(state.status,
                                                                            "cyan")
    console.print(f"job {state.job_id}: [{style}]{state.status}[/]"
                  + (f" ({escape(state.message)})" if state.message else ""))


JobIdArg = Annotated[str, typer.Argument(help="Job id printed by `submit`.",
                                         show_default=False)]


@jobs_app.command("status")
def jobs_status(job_id: JobIdArg, address: JobsAddressOption) -> None:
    """Print the status of a submitted job: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED."""
    _configure_logging(False)
    with _user_errors():
        from mmts_search.search.submit import get_job_state

        state = get_job_state(address, job_id)
    _print_state(state)


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobIdArg,
    address: JobsAddressOption,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new log lines until the job ends.")] = False,
) -> None:
    """Print the logs of a submitted job (the output of its `mmts-search run`)."""
    _configure_logging(False)
    with _user_errors():
        from mmts_search.search.submit import follow_job_logs, get_job_logs

        if follow:
            follow_job_logs(address, job_id, lambda text: console.out(text, end=""))
        else:
            console.out(get_job_logs(address, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: JobsAddressOption) -> None:
    """Stop a submitted job; its sweep can continue later with `resume`."""
    _configure_logging(False)
    with _user_errors():
        from mmts_search.search.submit import stop_job

        stopped = stop_job(address, job_id)
    console.print(f"job {job_id}: " + ("stop requested" if stopped else "had already ended"))


# --------------------------------------------------------------------------------------
# trial, concepts, report
# --------------------------------------------------------------------------------------


@app.command()
def trial(
    file: SweepFileArg,
    overrides: SetOption = None,
    family: Annotated[str | None, typer.Option(
        "--family", help="Schedule family to train. Default: the first of "
                         "schedule.families.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="JSON file for the configuration and the metrics of every "
                               "epoch. Default: none written.", show_default=False)] = None,
    verbose: VerboseOption = False,
) -> None:
    """Train one trial in this process, without Ray, and show each epoch's metrics.

    Each parameter takes its fixed value from the file, else the midpoint of its range
    (geometric midpoint for log ranges). Accepts the best.yaml that `run` writes.
    """
    _configure_logging(verbose)
    with _user_errors():
        from mmts_search.spec import load_sweep

        spec = load_sweep(file, overrides or [])
        from workers.trainable import run_single_trial

        try:
            run_single_trial(spec, family=family, output=output, console=console)
        except ValueError as exc:
            # DataError (a ValueError) is a broken dataset, not a bad option.
            invalid = type(exc).__name__ != "DataError"
            _fail(str(exc), EXIT_INVALID if invalid else EXIT_ERROR)


@app.command()
def concepts(
    captions_file: Annotated[Path, typer.Argument(
        help="Captions file: one caption per line, or IMAGE#N<TAB>caption lines.",
        show_default=False)],
    clusters: Annotated[int, typer.Option(
        "--clusters", "-k", min=1, help="Number of concept clusters K.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="CSV file for the cluster sizes (class_id,count); the "
                               "per-caption assignments go next to it.",
        show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the embedding and "
                                                     "K-Means.")] = 0,
    embedder: Annotated[str, typer.Option(
        "--embedder", help="Caption embedding: 'tfidf', or a sentence-transformers model "
                           "name or path (needs the 'text' extra).")] = "tfidf",
) -> None:
    """Cluster captions into K concepts and write the cluster sizes (concept frequencies)."""
    _configure_logging(False)
    with _user_errors():
        from mmts_search.concepts import run_concepts

        try:
            result = run_concepts(captions_file, n_clusters=clusters, output=output,
                                  seed=seed, embedder=embedder)
        except ValueError as exc:
            _fail(str(exc), EXIT_INVALID)
    sizes = result.sizes
    console.print(f"{len(result.labels)} captions in {len(sizes)} clusters "
                  f"(sizes {int(sizes.min())} to {int(sizes.max())}) written to "
                  f"{escape(str(output))}")


@app.command()
def report(
    experiment: Annotated[str, typer.Option(
        "--experiment", help="MLflow experiment of the sweeps (tracking.experiment).")
    ] = "mmts",
    sweep: Annotated[str | None, typer.Option(
        "--sweep", help="Sweep name; default: the latest sweep of the experiment.",
        show_default=False)] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Number of trials listed.")] = 10,
    output_format: Annotated[str, typer.Option(
        "--format", help="Output format: table, csv or json.")] = "table",
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.",
        show_default=False)] = None,
) -> None:
    """Print the leaderboard of a sweep, read back from MLflow."""
    _configure_logging(False)
    if output_format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, got {output_format!r}", EXIT_INVALID)
    with _user_errors():
        from mmts_search.tracking import leaderboard_from_mlflow, render_report

        uri = tracking_uri or "sqlite:///mlflow.db"
        try:
            board = leaderboard_from_mlflow(uri, experiment=experiment, sweep=sweep, top=top)
        except ValueError as exc:
            # An experiment or sweep that the tracking store does not contain.
            _fail(str(exc))
        text = render_report(board, output_format)
    console.out(text, end="" if text.endswith("\n") else "\n")


def main() -> None:
    """Run the command line, as the ``mmts-search`` console script does."""
    app(prog_name="mmts-search")
