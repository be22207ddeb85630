"""Benchmark ``retrieval_metrics`` at COCO size against a naive full-argsort ranking.

COCO 5k test size: 5,000 items, 25,000 captions (five per item), D = 512, float32.
The naive reference computes the full (25,000, 5,000) similarity matrix, argsorts every
row for text-to-image and every column for image-to-text, and reads the rank of the
matching item (or of the best-ranked matching caption). Targets: ``retrieval_metrics`` at
least 3x faster than the reference, with a peak memory of at most 1 GB (10^9 bytes).
Both give the same recalls and ranks on these inputs, which is checked first.

Each side runs in its own subprocess, so the peak memory of one does not hide the other.

Run: ``python benchmarks/bench_metrics.py`` (``--help`` for options).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    PeakMemory,
    Report,
    base_parser,
    finish,
    run_in_subprocess,
    setup_torch,
)

N_ITEMS = 5_000
CAPTIONS_PER_ITEM = 5
DIM = 512
KS = (1, 5, 10)
MIN_SPEEDUP = 3.0
MAX_PEAK_BYTES = 10**9  # 1 GB
AGREEMENT_TOLERANCE = 1e-3


def make_inputs(n_items: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return (N, D) item and (5N, D) caption embeddings, L2-normalized, and (5N,) owners.

    Captions are noisy copies of their item, so recalls land between 0 and 100.
    """
    generator = torch.Generator().manual_seed(seed)
    items = F.normalize(torch.randn(n_items, DIM, generator=generator), dim=1)
    text_to_item = torch.arange(n_items).repeat_interleave(CAPTIONS_PER_ITEM)
    noise = torch.randn(len(text_to_item), DIM, generator=generator)
    texts = F.normalize(items[text_to_item] + 0.25 * noise, dim=1)
    return {"item_emb": items.to(device), "text_emb": texts.to(device),
            "text_to_item": text_to_item.to(device)}


def naive_retrieval_metrics(item_emb: torch.Tensor, text_emb: torch.Tensor,
                            text_to_item: torch.Tensor,
                            ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Compute recalls (percent), median and mean rank (1-based) by full argsort.

    Args:
        item_emb: (N, D) item embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_item: (M,) index of the item each caption belongs to.
    """
    n_items = item_emb.shape[0]
    sims = text_emb @ item_emb.T

    # Text to image: position of the caption's own item in its sorted row.
    order = sims.argsort(dim=1, descending=True)
    t2i_rank = (order == text_to_item[:, None]).int().argmax(dim=1)
    del order

    # Image to text: position of the first of the item's captions in its sorted row.
    order = sims.T.argsort(dim=1, descending=True)
    owners = text_to_item[order]
    del order
    arange = torch.arange(n_items, device=sims.device)
    i2t_rank = (owners == arange[:, None]).int().argmax(dim=1)
    del owners

    metrics: dict[str, float] = {}
    for prefix, rank in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        for k in ks:
            metrics[f"{prefix}_r{k}"] = 100.0 * float((rank < k).float().mean())
        # The median of an even count is the mean of the two middle ranks.
        metrics[f"{prefix}_medr"] = float((rank + 1).double().quantile(0.5))
        metrics[f"{prefix}_meanr"] = float((rank + 1).float().mean())
    metrics["rsum"] = sum(metrics[f"{prefix}_r{k}"] for prefix in ("t2i", "i2t") for k in ks)
    return metrics


def measure(kind: str, n_items: int, device_name: str, threads: int, warmup: int,
            repeats: int) -> dict[str, Any]:
    """Time one metrics implementation and measure its peak memory (run in a subprocess).

    ``kind`` is ``product`` (``retrieval_metrics``) or ``naive``.
    """
    device = setup_torch(device_name, threads)
    inputs = make_inputs(n_items, device)
    if kind == "product":
        from mmts_search.metrics import retrieval_metrics

        function = retrieval_metrics
    else:
        function = naive_retrieval_metrics

    # The warm-up runs on a tenth of the data: it loads kernels and starts thread pools,
    # and a full-size warm-up of the naive reference would double its long run.
    warm = make_inputs(max(n_items // 10, 20), device, seed=1)
    for _ in range(warmup):
        function(warm["item_emb"], warm["text_emb"], warm["text_to_item"], ks=KS)
    del warm
    seconds: list[float] = []
    peaks: list[int] = []
    method = ""
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            result = function(inputs["item_emb"], inputs["text_emb"], inputs["text_to_item"],
                              ks=KS)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.peak_bytes)
        method = peak.method
    return {"seconds": statistics.median(seconds), "peak_bytes": max(peaks),
            "method": method, "metrics": {key: float(value) for key, value in result.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the metrics benchmark and return the exit status (1 when a target is missed)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=N_ITEMS,
                        help=f"number of items; captions are 5x (default {N_ITEMS})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls of retrieval_metrics (the reference runs once)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    report = Report("metrics", settings={"device": str(device), "threads": args.threads,
                                         "items": args.items,
                                         "captions": args.items * CAPTIONS_PER_ITEM})
    report.note(f"device {device}, torch threads {args.threads}, {args.items} items, "
                f"{args.items * CAPTIONS_PER_ITEM} captions, D = {DIM}; one warm-up call on a "
                f"tenth of the data, then retrieval_metrics: median of {args.repeats} "
                "calls; naive: 1 call")

    common = {"n_items": args.items, "device_name": str(device), "threads": args.threads}
    product = run_in_subprocess(measure, kind="product", warmup=1, repeats=args.repeats,
                                **common)
    naive = run_in_subprocess(measure, kind="naive", warmup=1, repeats=1, **common)

    shared_keys = sorted(set(product["metrics"]) & set(naive["metrics"]))
    differences = [abs(product["metrics"][key] - naive["metrics"][key]) for key in shared_keys]
    worst = max(differences) if differences else float("nan")
    report.add("agreement_max_abs_diff", worst, op="<=", target=AGREEMENT_TOLERANCE,
               note=f"over {len(shared_keys)} shared keys")
    for key, difference in zip(shared_keys, differences, strict=True):
        if difference > AGREEMENT_TOLERANCE:
            report.note(f"{key}: retrieval_metrics {product['metrics'][key]:.4f} "
                        f"vs naive {naive['metrics'][key]:.4f}")

    report.add("seconds.retrieval_metrics", product["seconds"], unit="s")
    report.add("seconds.naive_argsort", naive["seconds"], unit="s")
    report.add("speedup_vs_naive_argsort", naive["seconds"] / product["seconds"],
               op=">=", target=MIN_SPEEDUP)
    report.add("peak_memory.retrieval_metrics", product["peak_bytes"] / 1e6, unit="MB",
               op="<=", target=MAX_PEAK_BYTES / 1e6, note=product["method"])
    report.add("peak_memory.naive_argsort", naive["peak_bytes"] / 1e6, unit="MB",
               note=naive["method"])
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
