"""Benchmark the worker's training step against a minimal hand-written PyTorch loop.

Setup: ``builtin:synthetic-lt`` features (D = 512, one caption per item), projection
heads (``model.kind: projection``, linear, 512 to 256), B = 1024, InfoNCE.

- Worker: the trial's own code path, ``workers.trainable._build_run`` (data, model,
  MM-TS schedule, AdamW, learning-rate scheduler) and ``workers.trainable._train_epoch``
  (shuffle, batch gather, per-sample temperature from the schedule, ``info_nce``,
  finiteness check, backward, optimizer and scheduler step). Evaluation is not timed.
- Reference: the same data tensors, two ``nn.Linear(512, 256)`` heads, L2 normalization,
  the CLIP loss with a scalar temperature and AdamW, written as the shortest loop that
  does the same matrix work.

Both train whole epochs over the same training split, in turn. Target: the worker's
throughput (training samples per second) at least 0.90 of the reference's.

Run: ``python benchmarks/bench_train_step.py`` (``--help`` for options).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import Report, base_parser, finish, setup_torch, time_interleaved
from torch import nn

BATCH = 1024
DIM = 512
EMBED_DIM = 256
STEPS_PER_EPOCH = 8
TEST_FRACTION = 0.2
MIN_RATIO = 0.90
MMTS_PARAMS = {"alpha": 0.1, "oscillations": 2, "shift_min": 0.08, "shift_max": 0.3}


def make_spec(device: torch.device, steps_per_epoch: int) -> Any:
    """Return a sweep spec whose training split is exactly ``steps_per_epoch`` batches."""
    from mmts_search.spec import SweepSpec

    n_train = steps_per_epoch * BATCH
    n_items = int(round(n_train / (1 - TEST_FRACTION)))
    return SweepSpec.model_validate({
        "name": "bench-train-step",
        "datasets": [{"name": "synthetic", "source": "builtin:synthetic-lt", "n_items": n_items,
                      "dim": DIM, "n_concepts": 50, "test_fraction": TEST_FRACTION}],
        "model": {"kind": "projection", "embed_dim": EMBED_DIM, "head": "linear"},
        "training": {"epochs": 100, "batch_size": BATCH, "lr": 2e-3, "seed": 0,
                     "device": str(device)},
        "loss": "infonce",
        "tracking": {"uri": "sqlite:///unused.db"},
    })


class HandLoop:
    """The reference: two linear heads, CLIP loss with scalar tau, AdamW, nothing else."""

    def __init__(self, items: torch.Tensor, texts: torch.Tensor, device: torch.device) -> None:
        self.items = items
        self.texts = texts
        self.item_head = nn.Linear(DIM, EMBED_DIM).to(device)
        self.text_head = nn.Linear(DIM, EMBED_DIM).to(device)
        parameters = [*self.item_head.parameters(), *self.text_head.parameters()]
        self.optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.01,
                                           fused=device.type == "cuda")
        self.generator = torch.Generator().manual_seed(0)
        self.device = device

    def epoch(self) -> None:
        """Train one epoch over every training pair, in ``ceil(N / B)`` batches."""
        n = self.items.shape[0]
        order = torch.randperm(n, generator=self.generator).to(self.device)
        for batch in torch.tensor_split(order, math.ceil(n / BATCH)):
            image = F.normalize(self.item_head(self.items[batch]), dim=-1)
            text = F.normalize(self.text_head(self.texts[batch]), dim=-1)
            logits = image @ text.T / 0.07
            targets = torch.arange(logits.shape[0], device=logits.device)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def main(argv: list[str] | None = None) -> int:
    """Run the training-step benchmark and return the exit status (1 when a target is missed)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH,
                        help=f"batches of {BATCH} per timed epoch (default {STEPS_PER_EPOCH})")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed epochs of each side (default 15)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = setup_torch(args.device, args.threads)
    report = Report("train_step", settings={"device": str(device), "threads": args.threads,
                                            "batch": BATCH, "dim": DIM,
                                            "embed_dim": EMBED_DIM})

    # NOTE: `_build_run` and `_train_epoch` are private names of workers.trainable; they are
    # the only way to time the worker's training loop without its evaluation and reporting.
    from workers.trainable import _build_run, _loss_function, _train_epoch

    spec = make_spec(device, args.steps_per_epoch)
    run = _build_run(spec.datasets[0], 0, spec, "mmts", MMTS_PARAMS, device)
    loss_fn = _loss_function(spec.loss)
    train = run.data.train
    hand = HandLoop(train.item_inputs, train.text_inputs, device)
    samples = train.num_texts
    report.note(f"device {device}, torch threads {args.threads}, {samples} training pairs "
                f"per epoch ({run.steps_per_epoch} steps of B = {BATCH}), D = {DIM} -> "
                f"{EMBED_DIM}, MM-TS schedule {MMTS_PARAMS}; {args.repeats} rounds of one epoch "
                "each after 2 warm-up rounds, ratio = median of per-round ratios")

    epoch_counter = iter(range(1, 10_000))

    def worker_epoch() -> None:
        stats = _train_epoch(run, loss_fn, next(epoch_counter))
        if stats.diverged:
            raise RuntimeError(f"the worker's training diverged: {stats.diverged}")

    seconds = time_interleaved({"worker": worker_epoch, "hand_loop": hand.epoch},
                               device=device, warmup=2, repeats=args.repeats)
    worker_rate = samples / seconds["worker"]
    hand_rate = samples / seconds["hand_loop"]
    report.add("samples_per_second.worker", worker_rate, unit="samples/s")
    report.add("samples_per_second.hand_loop", hand_rate, unit="samples/s")
    report.add("ms_per_step.worker", seconds["worker"] / run.steps_per_epoch * 1e3, unit="ms")
    report.add("ms_per_step.hand_loop", seconds["hand_loop"] / run.steps_per_epoch * 1e3,
               unit="ms")
    # Throughput is samples per second, so its ratio is the inverse ratio of epoch times.
    report.add("throughput_ratio_worker_vs_hand_loop", seconds.ratio("hand_loop", "worker"),
               op=">=", target=MIN_RATIO)
    return finish(report, started, args.json)


if __name__ == "__main__":
    sys.exit(main())
