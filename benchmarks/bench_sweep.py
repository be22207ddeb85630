"""Benchmark the overhead of a sweep: how much of its wall time the trials spend training.

The demo sweep (``search_spaces/demo.yaml``: digits-lt, small encoders, TPE, median
pruner) runs through `mmts_search.search.driver.run_sweep`, as a user's sweep does: 2
trials at once on a local Ray instance, with MLflow tracking to a SQLite file and a
checkpoint after every epoch. The benchmark starts that Ray instance itself, bound to
127.0.0.1, with the settings the driver would use. Only the trial count is
reduced (``--num-samples``).

Definitions (all times are wall-clock seconds, ``time.time`` on one machine):

- Trial work: the time a trial spends inside ``workers.trainable._train_epoch``
  (training) and ``workers.trainable._evaluate`` (test metrics, which the pruner needs
  every epoch). The benchmark passes run_sweep a trainable that wraps
  ``workers.trainable.train_trial`` and times those two functions in the trial process.
- Sweep wall time W: from before Ray starts to after it stops, around ``run_sweep``.
- Training fraction: (sum of trial work over all trials) / (2 x W), where 2 is
  ``search.max_concurrent``; 1.0 would mean both trial slots trained all the time.
  Everything else is overhead: Ray start-up, trial start-up, scheduling, reporting,
  checkpointing, tracking and the final leaderboard and artifacts. Target: >= 0.75.
- Trial start-up: from Tune's ``on_trial_start`` in the driver to the start of the
  trial's first training epoch (actor and process start, imports, MLflow child run,
  data loading, model building). Reported as the median over trials.
- Per-epoch overhead: the gap between the end of one epoch's evaluation and the start
  of the next epoch's training (checkpoint, ``tune.report``, MLflow metrics).

Run: ``python benchmarks/bench_sweep.py`` (``--help`` for options).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import PROJECT_ROOT, Report, base_parser, finish

DEMO_SWEEP = PROJECT_ROOT / "search_spaces" / "demo.yaml"
CONCURRENT_TRIALS = 2
MIN_TRAINING_FRACTION = 0.75
TIMING_DIR_ENV = "MMTS_BENCH_TIMING_DIR"


def timed_train_trial(config: dict[str, Any], *, sweep: dict[str, Any],
                      run_context: dict[str, Any] | None = None) -> None:
    """Run ``workers.trainable.train_trial`` and record when its epochs train and evaluate.

    Each span is appended at once as a JSON line to ``<timing dir>/<trial id>.jsonl``, so
    that a trial that Tune stops (pruned) leaves its spans behind.
    """
    from ray import tune

    from workers import trainable as worker

    entered = time.time()
    trial_id = tune.get_context().get_trial_id() or f"pid{os.getpid()}"
    path = Path(os.environ[TIMING_DIR_ENV]) / f"{trial_id}.jsonl"

    def record(kind: str, start: float, end: float) -> None:
        span = {"kind": kind, "start": start, "end": end, "pid": os.getpid()}
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(span) + "\n")

    def timed(kind: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                record(kind, start, time.time())
        return wrapper

    original_train, original_evaluate = worker._train_epoch, worker._evaluate
    worker._train_epoch = timed("train", original_train)
    worker._evaluate = timed("evaluate", original_evaluate)
    record("enter", entered, entered)
    try:
        worker.train_trial(config, sweep=sweep, run_context=run_context)
    finally:
        worker._train_epoch, worker._evaluate = original_train, original_evaluate
        record("exit", time.time(), time.time())


def make_trial_clock() -> Any:
    """Return a Tune callback that records when the driver starts and ends each trial."""
    from ray.tune import Callback

    class TrialClock(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.ended: dict[str, float] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            self.ended[trial.trial_id] = time.time()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ended[trial.trial_id] = time.time()

    return TrialClock()


def read_spans(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Return the recorded spans of every trial, by trial id, in time order."""
    spans: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                spans[path.stem].append(json.loads(line))
    return {trial: sorted(items, key=lambda span: span["start"]) for trial, items in spans.items()}


def run_demo_sweep(num_samples: int, epochs: int | None, workdir: Path) -> dict[str, Any]:
    """Run the demo sweep with timing instrumentation; return the raw timings."""
    from mmts_search.search import driver
    from mmts_search.spec import load_sweep

    timing_dir = workdir / "timings"
    timing_dir.mkdir()
    overrides = [
        f"search.num_samples={num_samples}",
        f"search.max_concurrent={CONCURRENT_TRIALS}",
        f"storage={workdir / 'results'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
    ]
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    spec = load_sweep(DEMO_SWEEP, overrides)

    # The Ray workers started below inherit this environment.
    os.environ[TIMING_DIR_ENV] = str(timing_dir)
    os.environ.pop("RAY_ADDRESS", None)

    # NOTE: run_sweep takes no extra Tune callbacks, so the driver's private
    # `_attach_callbacks` is wrapped to add the clock to the callbacks it installs.
    clock = make_trial_clock()
    original_attach = driver._attach_callbacks

    def attach_with_clock(tuner: Any, callbacks: list[Any]) -> None:
        original_attach(tuner, [*callbacks, clock])

    driver._attach_callbacks = attach_with_clock
    try:
        start = time.time()
        # The same local instance that run_sweep would start (one CPU per core, no
        # dashboard), but bound to 127.0.0.1; its start and stop count in the wall time.
        import ray

        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
        try:
            outcome = driver.run_sweep(spec, trainable=timed_train_trial, track=True)
        finally:
            ray.shutdown()
        wall = time.time() - start
    finally:
        driver._attach_callbacks = original_attach

    return {"wall": wall, "fit_wall": outcome.wall_s, "sweep_start": start,
            "started": clock.started, "ended": clock.ended, "spans": read_spans(timing_dir),
            "leaderboard": outcome.leaderboard, "epochs_per_trial": int(spec.training.epochs)}


def analyze(report: Report, timings: dict[str, Any]) -> None:
    """Turn the raw timings into the fraction, start-up and overhead lines."""
    wall = timings["wall"]
    spans = timings["spans"]
    train_total = sum(s["end"] - s["start"] for items in spans.values() for s in items
                      if s["kind"] == "train")
    evaluate_total = sum(s["end"] - s["start"] for items in spans.values() for s in items
                         if s["kind"] == "evaluate")

    startups, to_entry, entry_to_train, epoch_gaps, finish_costs = [], [], [], [], []
    for trial_id, items in spans.items():
        trains = [s for s in items if s["kind"] == "train"]
        evaluations = [s for s in items if s["kind"] == "evaluate"]
        entries = [s for s in items if s["kind"] == "enter"]
        launched = timings["started"].get(trial_id)
        if trains and launched is not None:
            startups.append(trains[0]["start"] - launched)
        if entries and launched is not None:
            to_entry.append(entries[0]["start"] - launched)
        if entries and trains:
            entry_to_train.append(trains[0]["start"] - entries[0]["start"])
        for evaluation, next_train in zip(evaluations, trains[1:], strict=False):
            epoch_gaps.append(next_train["start"] - evaluation["end"])
        ended = timings["ended"].get(trial_id)
        if evaluations and ended is not None:
            finish_costs.append(ended - evaluations[-1]["end"])

    slots = CONCURRENT_TRIALS * wall
    epochs = sum(1 for items in spans.values() for s in items if s["kind"] == "train")
    processes = {s["pid"] for items in spans.values() for s in items}
    report.note(f"{len(spans)} trials in {len(processes)} worker processes, {epochs} trained "
                f"epochs, sweep wall time {wall:.1f} s (Tuner.fit {timings['fit_wall']:.1f} s), "
                f"{CONCURRENT_TRIALS} concurrent trials; trial work = time in _train_epoch + "
                "_evaluate")
    report.add("seconds.sweep_wall", wall, unit="s")
    report.add("seconds.trial_train_total", train_total, unit="s")
    report.add("seconds.trial_evaluate_total", evaluate_total, unit="s")
    report.add("training_fraction", (train_total + evaluate_total) / slots, op=">=",
               target=MIN_TRAINING_FRACTION,
               note="(train + evaluate) / (2 x sweep wall time)")
    report.add("training_fraction_without_evaluation", train_total / slots)
    if startups:
        report.add("trial_startup_median", statistics.median(startups), unit="s",
                   note=f"min {min(startups):.1f} s, max {max(startups):.1f} s")
    if to_entry:
        report.add("trial_startup_median.launch_to_trainable", statistics.median(to_entry),
                   unit="s", note="Ray actor and process start, imports, trainable fetch")
    if entry_to_train:
        report.add("trial_startup_median.trainable_to_first_epoch",
                   statistics.median(entry_to_train), unit="s",
                   note="MLflow child run, data loading, model and optimizer")
    if epoch_gaps:
        report.add("per_epoch_overhead_median", statistics.median(epoch_gaps), unit="s",
                   note="checkpoint, tune.report and MLflow metrics between epochs")
    if train_total and epochs:
        report.add("epoch_train_median",
                   statistics.median(s["end"] - s["start"] for items in spans.values()
                                     for s in items if s["kind"] == "train"), unit="s")
    if finish_costs:
        report.add("trial_finish_median", statistics.median(finish_costs), unit="s",
                   note="last evaluation to the driver's trial end: artifacts, plots")
    if startups and epoch_gaps:
        report_trial_ceiling(report, spans, statistics.median(startups),
                             statistics.median(epoch_gaps),
                             statistics.median(finish_costs) if finish_costs else 0.0)

    first_launch = min(timings["started"].values(), default=timings["sweep_start"])
    last_end = max(timings["ended"].values(), default=timings["sweep_start"] + wall)
    report.add("seconds.driver_before_first_trial", first_launch - timings["sweep_start"],
               unit="s", note="Ray start, MLflow parent run, study")
    report.add("seconds.driver_after_last_trial",
               timings["sweep_start"] + wall - last_end, unit="s",
               note="leaderboard, best.yaml, Optuna plots, Ray shutdown")


def report_trial_ceiling(report: Report, spans: dict[str, list[dict[str, Any]]],
                         startup: float, epoch_gap: float, finish_cost: float) -> None:
    """Note the best training fraction that trials of the measured size could reach.

    A trial works W seconds (training and evaluation) and pays S seconds of start-up,
    O seconds between each two of its E epochs and F seconds at its end. So it occupies
    its slot for W + S + (E - 1) * O + F seconds. With these costs the fraction cannot
    exceed W / (W + S + (E - 1) * O + F), however well the driver fills the slots.
    """
    works, epochs = [], []
    for items in spans.values():
        trained = [s for s in items if s["kind"] == "train"]
        if trained:
            epochs.append(len(trained))
            works.append(sum(s["end"] - s["start"] for s in items
                             if s["kind"] in ("train", "evaluate")))
    if not works:
        return
    work = statistics.median(works)
    epoch_count = statistics.median(epochs)
    busy = work + startup + max(epoch_count - 1, 0) * epoch_gap + finish_cost
    report.add("training_fraction_ceiling_per_trial", work / busy,
               note="median trial's work / its whole time in a slot")
    report.note(f"a median trial works {work:.2f} s over {epoch_count:g} epochs but pays "
                f"{startup:.2f} s of start-up, {epoch_gap:.3f} s between epochs and "
                f"{finish_cost:.2f} s at its end, so trials of this size cannot reach a "
                f"training fraction above {work / busy:.2f} unless the per-trial costs "
                "shrink")


def main(argv: list[str] | None = None) -> int:
    """Run the sweep-overhead benchmark and return the exit status."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=6,
                        help="trials of the demo sweep (default 6; the file has 16)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training.epochs override (default: the file's value)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report = Report("sweep", settings={"num_samples": args.num_samples,
                                       "concurrent": CONCURRENT_TRIALS, "epochs": args.epochs})
    if args.device not in ("auto", "cpu"):
        report.note(f"--device {args.device} is ignored: the demo sweep's trials pick "
                    "their device from training.device")
    with tempfile.TemporaryDirectory(prefix="mmts-bench-sweep-") as folder:
        timings = run_demo_sweep(args.num_samples, args.epochs, Path(folder))
    analyze(report, timings)
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
