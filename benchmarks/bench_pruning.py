"""Benchmark pruning: the same sweep budget with and without the median pruner.

The demo sweep (``search_spaces/demo.yaml``: digits-lt, small encoders, TPE, 2 trials
at once) runs with a small budget (``--num-samples`` trials of ``--epochs`` epochs) for
each of ``--seeds`` seeds, once with ``pruner.kind: median`` and once with
``pruner.kind: none``. The seed sets both ``search.seed`` and ``training.seed``. All
sweeps share one local Ray instance and skip MLflow tracking, which this benchmark does
not measure.

Targets:

- mean over seeds of the best objective (rsum of the best trial, ``best.yaml``'s trial)
  with pruning, divided by the same mean without: >= 0.98;
- epochs trained with pruning (summed over trials and seeds), divided by the epochs
  without: <= 0.60.

Run: ``python benchmarks/bench_pruning.py`` (``--help`` for options).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PROJECT_ROOT, Report, base_parser, finish

DEMO_SWEEP = PROJECT_ROOT / "search_spaces" / "demo.yaml"
MIN_OBJECTIVE_RATIO = 0.98
MAX_EPOCH_RATIO = 0.60


def run_one(pruner: str, seed: int, num_samples: int, epochs: int, workdir: Path) -> dict:
    """Run one sweep and return its best objective, epochs trained and trial statuses."""
    from mmts_search.search.driver import run_sweep
    from mmts_search.spec import load_sweep

    name = f"pruning-{pruner}-seed{seed}"
    spec = load_sweep(DEMO_SWEEP, [
        f"name={name}",
        f"search.num_samples={num_samples}",
        "search.max_concurrent=2",
        f"search.seed={seed}",
        f"training.seed={seed}",
        f"training.epochs={epochs}",
        f"pruner.kind={pruner}",
        f"storage={workdir / 'results'}",
        f"tracking.uri=sqlite:///{workdir / 'unused-mlflow.db'}",
    ])
    start = time.perf_counter()
    outcome = run_sweep(spec, track=False)
    seconds = time.perf_counter() - start
    board = outcome.leaderboard
    statuses = board["status"].value_counts().to_dict() if not board.empty else {}
    best = float(outcome.best["objective"]) if outcome.best else float("nan")
    return {"best": best, "epochs": int(board["epochs"].sum()) if not board.empty else 0,
            "statuses": statuses, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Run the pruning benchmark and return the exit status (1 when a target is missed)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8, help="trials per sweep (default 8)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (default 6)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (default 3)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report = Report("pruning", settings={"num_samples": args.num_samples,
                                         "epochs": args.epochs, "seeds": args.seeds})
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # One local instance for every sweep: run_sweep uses an initialized Ray and leaves it
    # running, so the start-up is paid once.
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    results: dict[str, list[dict[str, Any]]] = {"median": [], "none": []}
    try:
        with tempfile.TemporaryDirectory(prefix="mmts-bench-pruning-") as folder:
            for seed in range(args.seeds):
                for pruner in ("median", "none"):
                    outcome = run_one(pruner, seed, args.num_samples, args.epochs, Path(folder))
                    results[pruner].append(outcome)
                    report.note(f"seed {seed}, pruner {pruner}: best objective "
                                f"{outcome['best']:.2f}, {outcome['epochs']} epochs, trials "
                                f"{outcome['statuses']}, {outcome['seconds']:.0f} s")
    finally:
        ray.shutdown()

    best_pruned = statistics.fmean(r["best"] for r in results["median"])
    best_full = statistics.fmean(r["best"] for r in results["none"])
    epochs_pruned = sum(r["epochs"] for r in results["median"])
    epochs_full = sum(r["epochs"] for r in results["none"])
    report.add("best_objective.median_pruner", best_pruned, note="mean over seeds")
    report.add("best_objective.no_pruner", best_full, note="mean over seeds")
    report.add("best_objective_ratio", best_pruned / best_full, op=">=",
               target=MIN_OBJECTIVE_RATIO)
    report.add("epochs.median_pruner", epochs_pruned)
    report.add("epochs.no_pruner", epochs_full)
    report.add("epoch_ratio", epochs_pruned / max(epochs_full, 1), op="<=",
               target=MAX_EPOCH_RATIO)
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
