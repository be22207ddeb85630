"""Benchmark one trial epoch on 1,000,000 pairs of 512-dimensional synthetic features.

``builtin:synthetic-lt`` with ``n_items = 1,000,000`` and ``dim = 512``, one caption per
item, of which 5,000 pairs (0.5 %) form the test split. Projection heads 512 to 256,
B = 1024, InfoNCE, MM-TS schedule, one epoch, through ``workers.trainable.run_trial``
(the same code path as a Ray trial, without tracking). The trial runs in a fresh
subprocess so that its peak resident set is its own.

Reported: seconds for data generation and set-up, for the training epoch and for the
evaluation, and the peak resident set (RSS) of the trial minus the RSS before it. The
ratio checked is that peak divided by the size of one float32 copy of both modalities
(2 x N x D x 4 bytes). Target: at most 1.25. A second full copy of one modality would
add 0.5 to the ratio, so the target leaves room for the model, batches and evaluation
embeddings but not for a duplicate of the data.

NOTE: most of the RSS above one copy is glibc's heap, not data. With the default dynamic
mmap threshold, freed per-batch buffers stay in the heap, and the RSS grows by about 20 %
of one copy during the epoch. With ``MALLOC_MMAP_THRESHOLD_=131072`` it grows by about
4 % (measured at 250,000 pairs on a 2-core AMD EPYC with torch 2.13 CPU).

Run: ``python benchmarks/bench_scale.py`` (``--help`` for options).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import GIB, PeakMemory, Report, base_parser, finish, run_in_subprocess, setup_torch

N_ITEMS = 1_000_000
DIM = 512
EMBED_DIM = 256
BATCH = 1024
TEST_FRACTION = 0.005
MAX_COPY_RATIO = 1.25
MMTS_PARAMS = {"alpha": 0.1, "oscillations": 2, "shift_min": 0.08, "shift_max": 0.3}


def make_spec(n_items: int, device: Any, threads: int) -> Any:
    """Return the one-epoch sweep spec of the benchmark for ``n_items`` pairs."""
    from mmts_search.spec import SweepSpec

    return SweepSpec.model_validate({
        "name": "bench-scale",
        "datasets": [{"name": "synthetic", "source": "builtin:synthetic-lt",
                      "n_items": n_items, "dim": DIM, "n_concepts": 100,
                      "test_fraction": TEST_FRACTION}],
        "model": {"kind": "projection", "embed_dim": EMBED_DIM, "head": "linear"},
        "training": {"epochs": 1, "batch_size": BATCH, "lr": 2e-3, "seed": 0,
                     "device": str(device), "eval_batch_size": 8192},
        "loss": "infonce",
        "pruner": {"kind": "none"},
        # The trial sets torch's thread count from its CPU request.
        "resources": {"cpu": threads},
    })


def run_one_epoch(n_items: int, device_name: str, threads: int) -> dict[str, Any]:
    """Run a one-epoch trial and return its timings and peak memory (run in a subprocess)."""
    device = setup_torch(device_name, threads)
    from workers import trainable as worker

    # A small trial first, so that the measured one does not count the modules the
    # trial imports on first use (MLflow, scikit-learn, torch._dynamo, matplotlib).
    worker.run_trial(make_spec(2_000, device, threads), "mmts", MMTS_PARAMS,
                     report=lambda metrics: None)
    spec = make_spec(n_items, device, threads)

    spans: dict[str, float] = {}

    def timed(kind: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            spans[f"{kind}_start"] = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spans[f"{kind}_end"] = time.perf_counter()
        return wrapper

    worker._train_epoch = timed("train", worker._train_epoch)
    worker._evaluate = timed("evaluate", worker._evaluate)

    reports: list[dict[str, Any]] = []
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        worker.run_trial(spec, "mmts", MMTS_PARAMS, report=reports.append)
        end = time.perf_counter()
    result: dict[str, Any] = {
        "seconds_total": end - start,
        "seconds_setup": spans["train_start"] - start,
        "seconds_train_epoch": spans["train_end"] - spans["train_start"],
        "seconds_evaluate": spans["evaluate_end"] - spans["evaluate_start"],
        "seconds_after": end - spans["evaluate_end"],
        "peak_bytes": peak.peak_bytes,
        "method": peak.method,
        "rsum": float(reports[-1].get("rsum", float("nan"))) if reports else float("nan"),
    }
    if device.type == "cuda":
        import torch

        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark and return the exit status (1 when a target is missed)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=N_ITEMS,
                        help=f"pairs of the synthetic dataset (default {N_ITEMS})")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    report = Report("scale", settings={"device": str(device), "threads": args.threads,
                                       "items": args.items, "dim": DIM})
    result = run_in_subprocess(run_one_epoch, timeout=1800, n_items=args.items,
                               device_name=str(device), threads=args.threads)

    one_copy = 2 * args.items * DIM * 4
    steps = -(-int(args.items * (1 - TEST_FRACTION)) // BATCH)
    report.note(f"device {device}, torch threads {args.threads}, {args.items} pairs, "
                f"D = {DIM} -> {EMBED_DIM}, B = {BATCH}, about {steps} steps, "
                f"{TEST_FRACTION:.1%} test split; one copy of both modalities is "
                f"{one_copy / GIB:.2f} GiB")
    report.add("seconds.total", result["seconds_total"], unit="s")
    report.add("seconds.data_and_setup", result["seconds_setup"], unit="s")
    report.add("seconds.train_epoch", result["seconds_train_epoch"], unit="s")
    report.add("seconds.evaluate", result["seconds_evaluate"], unit="s")
    report.add("samples_per_second.train", args.items * (1 - TEST_FRACTION)
               / result["seconds_train_epoch"], unit="samples/s")
    report.add("peak_memory", result["peak_bytes"] / GIB, unit="GiB", note=result["method"])
    if "cuda_peak_bytes" in result:
        report.add("peak_memory.cuda", result["cuda_peak_bytes"] / GIB, unit="GiB",
                   note="torch.cuda.max_memory_allocated")
    report.add("peak_memory_vs_one_copy", result["peak_bytes"] / one_copy, op="<=",
               target=MAX_COPY_RATIO)
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
