"""Benchmark the contrastive losses (forward plus backward) against references.

Measured at B in {512, 1024, 2048}, D = 512, float32, on L2-normalized random
embeddings that require gradients:

- ``info_nce`` with a per-sample temperature (B,) against the standard CLIP loss with a
  scalar temperature on the same inputs. Target: time ratio <= 1.10 at every B.
- ``max_margin`` with a per-anchor margin (B,) against a reference that materializes the
  2*B*(B-1) hinge terms through index selection. Targets: the same value within 1e-5,
  at least 2x faster at B = 1024 and 3x at B = 2048, and lower peak memory.
- Both against the bare matrix products that any such loss needs: one (B, D) x (D, B)
  similarity product forward and two (B, B) x (B, D) products for the gradients.
  Reported only; the closer to 1, the better.

Run: ``python benchmarks/bench_losses.py`` (``--help`` for options).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    MIB,
    PeakMemory,
    Report,
    base_parser,
    finish,
    run_in_subprocess,
    setup_torch,
    time_interleaved,
)

BATCH_SIZES = (512, 1024, 2048)
DIM = 512
TAU = 0.07
INFO_NCE_MAX_RATIO = 1.10
MAX_MARGIN_MIN_SPEEDUP = {1024: 2.0, 2048: 3.0}
VALUE_TOLERANCE = 1e-5
REPEATS = {512: 31, 1024: 21, 2048: 11}


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Compute the standard symmetric CLIP loss with one scalar temperature.

    Args:
        image_emb: (B, D) L2-normalized image embeddings.
        text_emb: (B, D) L2-normalized text embeddings; row i matches image i.
        tau: temperature, a positive float.
    """
    logits = image_emb @ text_emb.T / tau
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def max_margin_pairs_reference(image_emb: torch.Tensor, text_emb: torch.Tensor,
                               margin: torch.Tensor) -> torch.Tensor:
    """Compute the bidirectional ranking hinge by listing every (anchor, negative) pair.

    The loss is the mean over all i != j of relu(m_i - s_ii + s_ij) and
    relu(m_i - s_ii + s_ji), so 2*B*(B-1) terms, with s the (B, B) cosine similarities.
    This is the straightforward way: the index lists and the gathered terms are
    materialized as (B*(B-1),) tensors.

    Args:
        image_emb: (B, D) L2-normalized image embeddings.
        text_emb: (B, D) L2-normalized text embeddings.
        margin: (B,) margin of each anchor.
    """
    batch = image_emb.shape[0]
    sims = image_emb @ text_emb.T
    positives = sims.diagonal()
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=sims.device)
    anchor, other = off_diagonal.nonzero(as_tuple=True)
    anchor_term = margin[anchor] - positives[anchor]
    image_to_text = torch.relu(anchor_term + sims[anchor, other])
    text_to_image = torch.relu(anchor_term + sims[other, anchor])
    return torch.cat([image_to_text, text_to_image]).mean()


def bare_products(image_emb: torch.Tensor, text_emb: torch.Tensor,
                  grad_sims: torch.Tensor) -> None:
    """Run the three matrix products a similarity loss cannot avoid, without autograd.

    Args:
        image_emb: (B, D).
        text_emb: (B, D).
        grad_sims: (B, B), standing in for the gradient of the loss with respect to the
            similarity matrix.
    """
    with torch.no_grad():
        image_emb @ text_emb.T
        grad_sims @ text_emb
        grad_sims.T @ image_emb


def make_inputs(batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return normalized (B, D) embeddings with gradients, per-sample tau and margin (B,)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, DIM, generator=generator), dim=1)
    tau = 0.04 + 0.06 * torch.rand(batch, generator=generator)
    margin = 0.05 + 0.25 * torch.rand(batch, generator=generator)
    return {
        "image": image.to(device).requires_grad_(True),
        "text": text.to(device).requires_grad_(True),
        "tau": tau.to(device),
        "margin": margin.to(device),
        "grad_sims": torch.randn(batch, batch, generator=generator).to(device) / batch,
    }


def forward_backward(loss_fn: Any, inputs: dict[str, torch.Tensor], *args: Any) -> float:
    """Run one forward and backward pass of ``loss_fn`` and return the loss value."""
    inputs["image"].grad = None
    inputs["text"].grad = None
    loss = loss_fn(inputs["image"], inputs["text"], *args)
    loss.backward()
    return float(loss.detach())


def measure_peak(kind: str, batch: int, device_name: str, threads: int) -> dict[str, Any]:
    """Measure the peak extra memory of one forward plus backward (run in a subprocess).

    ``kind`` is ``max_margin`` (the product) or ``pairs_reference``.
    """
    device = setup_torch(device_name, threads)
    inputs = make_inputs(batch, device)
    if kind == "max_margin":
        from mmts_search.losses import max_margin

        loss_fn = max_margin
    else:
        loss_fn = max_margin_pairs_reference

    # The warm-up pass pays one-time allocations (thread pools, kernel workspaces),
    # so the measured pass counts only what the loss itself needs.
    forward_backward(loss_fn, inputs, inputs["margin"])
    with PeakMemory(device) as peak:
        forward_backward(loss_fn, inputs, inputs["margin"])
    return {"peak_bytes": peak.peak_bytes, "method": peak.method}


def bench_batch(report: Report, batch: int, device: torch.device) -> None:
    """Time both losses, their references and the bare products at one batch size."""
    from mmts_search.losses import info_nce, max_margin

    inputs = make_inputs(batch, device)
    tau, margin = inputs["tau"], inputs["margin"]

    # Correctness first: a ratio between two functions that compute different
    # things would mean nothing.
    constant_tau = torch.full_like(tau, TAU)
    nce_value = forward_backward(info_nce, inputs, constant_tau)
    clip_value = forward_backward(clip_loss, inputs, TAU)
    report.add(f"info_nce_const_tau_vs_clip_abs_diff.B{batch}", abs(nce_value - clip_value),
               op="<=", target=VALUE_TOLERANCE)
    product_value = forward_backward(max_margin, inputs, margin)
    product_grad = inputs["image"].grad.clone()
    reference_value = forward_backward(max_margin_pairs_reference, inputs, margin)
    reference_grad = inputs["image"].grad.clone()
    report.add(f"max_margin_vs_pairs_abs_diff.B{batch}", abs(product_value - reference_value),
               op="<=", target=VALUE_TOLERANCE)
    report.add(f"max_margin_vs_pairs_grad_max_abs_diff.B{batch}",
               float((product_grad - reference_grad).abs().max()))

    seconds = time_interleaved(
        {
            "info_nce": lambda: forward_backward(info_nce, inputs, tau),
            "clip": lambda: forward_backward(clip_loss, inputs, TAU),
            "max_margin": lambda: forward_backward(max_margin, inputs, margin),
            "pairs_reference": lambda: forward_backward(max_margin_pairs_reference, inputs,
                                                        margin),
            "bare": lambda: bare_products(inputs["image"], inputs["text"],
                                          inputs["grad_sims"]),
        },
        device=device, warmup=2, repeats=REPEATS.get(batch, 5),
    )
    for name, value in seconds.items():
        report.add(f"seconds.{name}.B{batch}", value * 1e3, unit="ms")

    report.add(f"info_nce_vs_clip.B{batch}", seconds.ratio("info_nce", "clip"),
               op="<=", target=INFO_NCE_MAX_RATIO)
    speedup = seconds.ratio("pairs_reference", "max_margin")
    min_speedup = MAX_MARGIN_MIN_SPEEDUP.get(batch)
    report.add(f"max_margin_speedup_vs_pairs.B{batch}", speedup,
               op=">=" if min_speedup else None, target=min_speedup)

    # A loss that cost no more than its three matrix products would reach this speedup.
    # No implementation of the same math can beat it on this machine.
    bound = seconds.ratio("pairs_reference", "bare")
    report.add(f"max_margin_speedup_bound.B{batch}", bound)
    if min_speedup and speedup < min_speedup:
        reachable = "out of reach" if bound < min_speedup else "close to the limit"
        report.note(f"B={batch}: max_margin is {speedup:.2f}x faster than the pair-list "
                    f"reference, {speedup / bound:.0%} of the {bound:.2f}x that a loss "
                    "costing only its three matrix products would reach on this device; "
                    f"a {min_speedup:g}x target is {reachable} here")
    report.add(f"info_nce_vs_bare_products.B{batch}", seconds.ratio("info_nce", "bare"))
    report.add(f"max_margin_vs_bare_products.B{batch}", seconds.ratio("max_margin", "bare"))


def bench_memory(report: Report, batch: int, device_name: str, threads: int) -> None:
    """Compare the peak memory of ``max_margin`` and the pair-list reference at one B."""
    product = run_in_subprocess(measure_peak, kind="max_margin", batch=batch,
                                device_name=device_name, threads=threads)
    reference = run_in_subprocess(measure_peak, kind="pairs_reference", batch=batch,
                                  device_name=device_name, threads=threads)
    report.add(f"peak_memory.max_margin.B{batch}", product["peak_bytes"] / MIB, unit="MiB",
               note=product["method"])
    report.add(f"peak_memory.pairs_reference.B{batch}", reference["peak_bytes"] / MIB,
               unit="MiB", note=reference["method"])
    ratio = product["peak_bytes"] / max(reference["peak_bytes"], 1)
    report.add(f"max_margin_vs_pairs_peak_memory.B{batch}", ratio, op="<=", target=1.0)


def main(argv: list[str] | None = None) -> int:
    """Run the loss benchmark and return the exit status (1 when a target is missed)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    report = Report("losses", settings={"device": str(device), "threads": args.threads,
                                        "dim": DIM, "batch_sizes": args.batch_sizes})
    report.note(f"device {device}, torch threads {args.threads}, D = {DIM}, float32, "
                "2 warm-up rounds, then seconds are medians over rounds and ratios "
                "medians of per-round ratios")
    for batch in args.batch_sizes:
        bench_batch(report, batch, device)
    for batch in args.batch_sizes:
        bench_memory(report, batch, str(device), args.threads)
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
