"""Benchmark concept clustering of the 40,460 real Flickr8k captions with K = 100.

End to end means ``read_captions`` on ``Flickr8k.token.txt`` plus ``cluster_captions``
(TF-IDF embedding and K-Means, seed 0). Reported: seconds and peak memory. There is no
target; the numbers show what the one-off clustering step of a sweep costs.

The captions are read from ``flickr8k/Flickr8k.token.txt`` in the real-data folder
(``$MMTS_SHARED_DATA``, else ``shared/data`` beside the project). Without them the
benchmark is skipped with a message and exits 0.

Run: ``python benchmarks/bench_concepts.py`` (``--help`` for options).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    MIB,
    PeakMemory,
    Report,
    base_parser,
    finish,
    run_in_subprocess,
    setup_torch,
    shared_data_dir,
)

N_CLUSTERS = 100
CAPTIONS_FILE = Path("flickr8k") / "Flickr8k.token.txt"


def measure(path: str, n_clusters: int, device_name: str, threads: int,
            repeats: int) -> dict[str, Any]:
    """Time reading and clustering the captions and measure the peak memory (subprocess)."""
    device = setup_torch(device_name, threads)
    from threadpoolctl import threadpool_limits

    from mmts_search.concepts import cluster_captions, read_captions

    # scikit-learn's BLAS and OpenMP pools ignore torch's setting, so fix them too.
    threadpool_limits(threads)

    # Warm-up on a small slice loads scikit-learn's code paths and thread pools.
    sample = read_captions(path)[:2000]
    cluster_captions(sample, n_clusters=10, seed=0)
    del sample

    seconds: list[float] = []
    peaks: list[int] = []
    method = ""
    clusters = None
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            captions = read_captions(path)
            clusters = cluster_captions(captions, n_clusters=n_clusters, seed=0)
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.peak_bytes)
        method = peak.method
    assert clusters is not None
    return {"seconds": statistics.median(seconds), "peak_bytes": max(peaks), "method": method,
            "captions": len(captions), "clusters": int(len(clusters.sizes)),
            "largest": int(clusters.sizes.max()), "smallest": int(clusters.sizes.min())}


def main(argv: list[str] | None = None) -> int:
    """Run the clustering benchmark and return the exit status."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=N_CLUSTERS,
                        help=f"K of K-Means (default {N_CLUSTERS})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed end-to-end runs; the median is reported (default 3)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report = Report("concepts", settings={"threads": args.threads, "clusters": args.clusters})
    data = shared_data_dir()
    path = data / CAPTIONS_FILE if data is not None else None
    if path is None or not path.is_file():
        report.skip("Flickr8k captions not found: expected ../shared/data/flickr8k/"
                    "Flickr8k.token.txt beside the project, or set MMTS_SHARED_DATA")
        return finish(report, started, args.json)

    # Clustering runs on the CPU (scikit-learn); the device option does not apply.
    result = run_in_subprocess(measure, path=str(path), n_clusters=args.clusters,
                               device_name="cpu", threads=args.threads,
                               repeats=args.repeats)
    report.note(f"{result['captions']} captions, K = {result['clusters']}, cluster sizes "
                f"{result['smallest']} to {result['largest']}, threads {args.threads}, "
                f"median of {args.repeats} run(s) after a warm-up on 2,000 captions")
    report.add("seconds_end_to_end", result["seconds"], unit="s")
    report.add("peak_memory", result["peak_bytes"] / MIB, unit="MiB", note=result["method"])
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
