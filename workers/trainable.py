"""The trial: train dual encoders with one candidate schedule, evaluate, report, checkpoint.

Entry points:

- `train_trial`: the Ray Tune function trainable. The driver wraps it with
  ``tune.with_parameters(train_trial, sweep=spec.model_dump(mode="json"), run_context=ctx)``.
- `run_trial`: the same trial in-process, with a report callback and an optional
  checkpoint folder (tests, benchmarks).
- `run_single_trial`: one trial with fixed schedule values for ``mmts-search trial``; it
  prints a live table of the epochs and can write them to JSON.

A trial loads every dataset of the sweep file once and builds one model, optimizer and
schedule per dataset. A reported epoch trains one epoch on each dataset in turn, then
evaluates each on its test split. Training details:

- An epoch visits every training caption once, in an order drawn from a
  ``torch.Generator`` owned by the trial, in ``ceil(M / batch_size)`` batches of nearly
  equal size (no sample is dropped). A batch pairs captions with their items by indexing
  the tensors on the device, without a DataLoader.
- Each step takes the per-sample temperature (the margin for ``loss: max_margin``) from
  the schedule at the current optimizer step and the batch's concept counts.
- AdamW; biases, 1-D weights and the learnable temperature get no weight decay. The
  learning rate warms up linearly over ``warmup_fraction`` of all steps and then follows
  a cosine to 0.
- The loss is checked for NaN and infinity every step on the CPU (free there) and every
  `CUDA_FINITE_CHECK_STEPS` steps and at the end of each epoch on CUDA (each check waits
  for the GPU). A non-finite loss or temperature ends the trial cleanly: the last report
  has ``diverged: 1`` and ``error`` with the reason, and the function returns.
- A checkpoint after every epoch contains the models, optimizers, learning-rate schedulers,
  step counters, shuffling generators, torch's global random state and the reports so
  far, saved with ``torch.save`` as plain tensors and dicts and read back with
  ``torch.load(..., weights_only=True)``. A restored trial continues after the last
  saved epoch and reports the same values as an uninterrupted run on the CPU.

Reported metrics (every value a float): ``epoch``, ``loss`` (mean training loss of the
epoch), the recalls ``t2i_r1 ... i2t_r10``, ``t2i_medr``, ``i2t_medr``, the mean ranks,
``rsum``, the head/mid/tail breakdown ``head_rsum, mid_rsum, tail_rsum`` and their
recalls, ``tau_mean, tau_min, tau_max`` (over the epoch's training samples), ``lr``,
``map``, ``ndcg`` and the ``cls_*`` class recalls where the dataset has concept labels,
``objective`` and ``diverged`` (0 or 1). With several datasets, each dataset's values are
prefixed ``<name>/`` and the plain names contain the aggregate over datasets. The
aggregate is ``objective.aggregate``: mean, min, median or weighted_mean by ``weight``.
Here min is the smallest value, which is the worst dataset for a metric that is maximized.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from workers.data import TrialData, fingerprint_dataset, load_dataset
from workers.device import resolve_device
from workers.models import DualEncoder, build_model

if TYPE_CHECKING:
    from rich.console import Console

    from mmts_search.spec import DatasetSpec, SweepSpec

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1

# On CUDA a finiteness check waits for the GPU, so it runs once per this many steps. A
# divergence is then noticed at most this many steps late.
CUDA_FINITE_CHECK_STEPS = 50

# Metrics present in every report; a diverged report sets them to NaN.
STANDARD_METRICS = (
    "loss", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "i2t_r1", "i2t_r5", "i2t_r10",
    "i2t_medr", "rsum", "head_rsum", "mid_rsum", "tail_rsum", "tau_mean", "tau_min",
    "tau_max",
)

ReportCallback = Callable[[dict[str, Any]], None]
PublishCallback = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def train_trial(config: dict[str, Any], *, sweep: dict[str, Any],
                run_context: dict[str, Any] | None = None) -> None:
    """Run one trial inside Ray Tune (function trainable).

    Args:
        config: the sampled point, flat: ``{"family": "mmts", "alpha": 0.1, ...}`` with
            exactly the family's parameters and optionally ``optuna_trial_number``.
        sweep: the sweep file as ``SweepSpec.model_dump(mode="json")``.
        run_context: MLflow parent run (``tracking_uri``, ``experiment_id``,
            ``parent_run_id``, ``sweep_name``), or None to track nothing.

    Each epoch is reported with ``ray.tune.report(metrics, checkpoint=...)``. When Tune
    restores the trial, training resumes from ``ray.tune.get_checkpoint()``.
    """
    from ray import tune

    from mmts_search.spec import SweepSpec

    spec = SweepSpec.model_validate(sweep)
    family, params = split_trial_config(config)

    context = tune.get_context()
    trial_id = context.get_trial_id() or "local"
    trial_dir = context.get_trial_dir()
    local_dir = Path(trial_dir) if trial_dir else Path(tempfile.mkdtemp(prefix="mmts-trial-"))

    restored = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint_state(Path(folder) / CHECKPOINT_FILE)
        logger.info("trial %s resumes after epoch %d", trial_id, restored["epoch"])

    def publish(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mmts-ckpt-") as folder:
            save_checkpoint_state(state, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    extra_params = {}
    if config.get("optuna_trial_number") is not None:
        extra_params["optuna_trial_number"] = config["optuna_trial_number"]
    _execute(spec, family, params, trial_id=trial_id, run_context=run_context,
             local_dir=local_dir, restored=restored, publish=publish, extra_params=extra_params)


def run_trial(
    spec: SweepSpec,
    family: str,
    params: dict[str, Any],
    *,
    report: ReportCallback,
    run_context: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    trial_id: str = "local",
) -> list[dict[str, Any]]:
    """Run one trial in this process, without Ray.

    Args:
        spec: the sweep file; its schedule space is ignored in favour of ``params``.
        family: schedule family, one of ``mmts_search.schedules.SCHEDULE_FAMILIES``.
        params: exactly the family's parameters.
        report: called with the metrics of each epoch (and the diverged report).
        run_context: MLflow parent run, or None for a local-only trial run.
        checkpoint_dir: when given, ``checkpoint.pt`` there is written after every epoch,
            and an existing one is resumed from.
        trial_id: id used for MLflow and logs.

    Returns:
        The reports of all epochs, including those before a resumed checkpoint.
    """
    restored = None
    checkpoint_file = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if checkpoint_file is not None and checkpoint_file.is_file():
        restored = load_checkpoint_state(checkpoint_file)
        logger.info("trial %s resumes from %s after epoch %d", trial_id, checkpoint_file,
                    restored["epoch"])

    def publish(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is not None and checkpoint_file is not None:
            save_checkpoint_state(state, checkpoint_file)
        report(metrics)

    with contextlib.ExitStack() as stack:
        if checkpoint_dir is not None:
            local_dir = Path(checkpoint_dir)
        else:
            local_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmts-")))
        return _execute(spec, family, params, trial_id=trial_id, run_context=run_context,
                        local_dir=local_dir, restored=restored, publish=publish,
                        extra_params={})


def run_single_trial(
    spec: SweepSpec,
    *,
    params: dict[str, Any] | None = None,
    family: str | None = None,
    output: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run one trial with fixed schedule values and show each epoch as it completes.

    The family is ``family`` or the first of ``schedule.families``. Its values are the
    sweep file's fixed values, else the midpoint of each range
    (``mmts_search.spec.midpoint_params``), overridden by ``params``.

    Args:
        spec: the sweep file.
        params: schedule values to use instead of the midpoints.
        family: schedule family to run.
        output: JSON file to write ``{"config": {...}, "epochs": [...]}`` to; NaN values
            are written as null.
        console: rich console for the live table (default: standard output).

    Returns:
        ``{"config": {"family": ..., <parameters>}, "epochs": [<report>, ...]}``.

    Raises:
        ValueError: for an unknown family or a parameter the family does not have.
    """
    from rich.console import Console
    from rich.live import Live

    from mmts_search.schedules import FAMILY_PARAMETERS
    from mmts_search.spec import midpoint_params

    chosen = family or spec.schedule.families[0]
    if chosen not in FAMILY_PARAMETERS:
        raise ValueError(f"unknown schedule family {chosen!r}; expected one of "
                         f"{', '.join(FAMILY_PARAMETERS)}")
    values: dict[str, Any] = dict(midpoint_params(spec, chosen))
    unknown = sorted(set(params or {}) - set(FAMILY_PARAMETERS[chosen]))
    if unknown:
        raise ValueError(f"schedule family {chosen!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters are {', '.join(FAMILY_PARAMETERS[chosen])}")
    values.update(params or {})

    console = console or Console()
    table = _epoch_table(spec)
    with Live(table, console=console, refresh_per_second=4, transient=False) as live:
        def show(metrics: dict[str, Any]) -> None:
            table.add_row(*_epoch_row(metrics))
            live.refresh()

        epochs = run_trial(spec, chosen, values, report=show)

    if not console.is_terminal:
        console.line()  # a live display in a file or pipe ends without a line break
    if epochs and epochs[-1].get("diverged"):
        console.print(f"[bold red]diverged:[/] {epochs[-1].get('error')}")

    result = {"config": {"family": chosen, **values}, "epochs": epochs}
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(_json_safe(result), indent=2) + "\n", encoding="utf-8")
        console.print(f"metrics written to {output}")
    return result


def split_trial_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a flat Tune config into (family, the family's parameters).

    Raises:
        ValueError: when the family is missing or unknown, or a parameter is missing.
    """
    from mmts_search.schedules import FAMILY_PARAMETERS

    family = config.get("family")
    if family not in FAMILY_PARAMETERS:
        raise ValueError(f"trial config must name a schedule family in 'family' (one of "
                         f"{', '.join(FAMILY_PARAMETERS)}) but got {family!r}")
    missing = [name for name in FAMILY_PARAMETERS[family] if name not in config]
    if missing:
        raise ValueError(f"trial config for family {family!r} lacks {', '.join(missing)}")
    return family, {name: config[name] for name in FAMILY_PARAMETERS[family]}


# --------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------


def save_checkpoint_state(state: dict[str, Any], path: Path) -> None:
    """Write a trial state with ``torch.save``, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """Read a trial state written by `save_checkpoint_state` (tensors and plain values)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a trial checkpoint of version {CHECKPOINT_VERSION} "
                         f"(found {found!r})")
    return state


# --------------------------------------------------------------------------------------
# One dataset's training state
# --------------------------------------------------------------------------------------


@dataclass
class _DatasetRun:
    """Model, optimizer, schedule and counters of one dataset within a trial."""

    spec: DatasetSpec
    data: TrialData
    model: DualEncoder
    schedule: Any  # mmts_search.schedules.Schedule
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    steps_per_epoch: int
    total_steps: int
    train_counts: np.ndarray  # (M_train,) float64, for head/mid/tail boundaries
    identity_pairs: bool  # caption j describes item j: one gather per batch suffices
    step: int = 0

    @property
    def name(self) -> str:
        return self.data.name


@dataclass
class _EpochStats:
    loss: float
    tau_mean: float
    tau_min: float
    tau_max: float
    diverged: str | None = None


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Return the LR factor: linear warmup over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(run_model: nn.Module, schedule: Any, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for parameter in run_model.parameters():
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if isinstance(schedule, nn.Module):
        no_decay.extend(schedule.parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _build_run(ds: DatasetSpec, index: int, spec: SweepSpec, family: str,
               params: dict[str, Any], device: torch.device) -> _DatasetRun:
    from mmts_search.schedules import make_schedule

    training = spec.training
    data = load_dataset(ds, seed=int(training.seed), device=device)

    batch_size = int(training.batch_size)
    if batch_size < 2:
        raise ValueError(f"training.batch_size must be at least 2 for a contrastive loss "
                         f"but got {batch_size}")
    steps_per_epoch = max(1, math.ceil(data.train.num_texts / batch_size))
    total_steps = steps_per_epoch * int(training.epochs)

    train_counts = data.train.counts.detach().cpu().numpy().astype(np.float64)
    schedule = make_schedule(
        family, params, total_steps=total_steps,
        min_count=int(train_counts.min()), max_count=int(train_counts.max()),
    )
    if isinstance(schedule, nn.Module):
        schedule.to(device)

    # Reseeded from (training.seed, dataset position) right before the model is built, so
    # that its initial weights do not depend on random numbers drawn while loading data.
    seeds = np.random.SeedSequence([int(training.seed), index]).generate_state(2)
    torch.manual_seed(int(seeds[0]))
    model = build_model(spec.model, data).to(device)
    generator = torch.Generator().manual_seed(int(seeds[1]))

    optimizer = torch.optim.AdamW(
        _param_groups(model, schedule, float(training.weight_decay)),
        lr=float(training.lr),
        fused=device.type == "cuda",
    )
    warmup_steps = int(round(float(training.warmup_fraction) * total_steps))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, warmup_steps)
    )

    identity = bool(
        data.train.num_texts == data.train.num_items
        and torch.equal(data.train.text_to_item,
                        torch.arange(data.train.num_texts, device=data.train.text_to_item.device))
    )
    return _DatasetRun(
        spec=ds, data=data, model=model, schedule=schedule, optimizer=optimizer,
        lr_scheduler=lr_scheduler, generator=generator, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, train_counts=train_counts, identity_pairs=identity,
    )


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def _loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                          torch.Tensor]:
    from mmts_search import losses

    if name == "infonce":
        return losses.info_nce
    if name == "max_margin":
        return losses.max_margin
    raise ValueError(f"loss must be 'infonce' or 'max_margin' but got {name!r}")


def _train_epoch(run: _DatasetRun, loss_fn: Callable[..., torch.Tensor],
                 epoch: int) -> _EpochStats:
    """Train one epoch of one dataset; stop at the first non-finite loss or temperature."""
    train = run.data.train
    device = train.text_inputs.device
    check_every = 1 if device.type == "cpu" else CUDA_FINITE_CHECK_STEPS

    run.model.train()
    order = torch.randperm(train.num_texts, generator=run.generator).to(device)
    losses: list[torch.Tensor] = []
    temperatures: list[torch.Tensor] = []

    for batch in torch.tensor_split(order, run.steps_per_epoch):
        item_rows = batch if run.identity_pairs else train.text_to_item[batch]
        tau = run.schedule.temperature(run.step, train.counts[batch])
        try:
            item_emb, text_emb = run.model(train.item_inputs[item_rows],
                                           train.text_inputs[batch])
            loss = loss_fn(item_emb, text_emb, tau)
        except ValueError:
            # The losses reject non-finite temperatures; a learnable one gets there when
            # training diverges, which ends the trial instead of failing it.
            if not bool(torch.isfinite(tau).all()):
                return _diverged(run, epoch, "the temperature became non-finite")
            raise

        losses.append(loss.detach())
        temperatures.append(tau.detach())
        if check_every == 1:
            finite = bool(torch.isfinite(loss))
        elif len(losses) % check_every == 0:
            finite = bool(torch.isfinite(torch.stack(losses[-check_every:])).all())
        else:
            finite = True
        if not finite:
            return _diverged(run, epoch, "the training loss became non-finite (NaN or inf)")

        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.lr_scheduler.step()
        run.step += 1

    loss_values = torch.stack(losses)
    if not bool(torch.isfinite(loss_values).all()):
        return _diverged(run, epoch, "the training loss became non-finite (NaN or inf)")
    taus = torch.cat(temperatures).float()
    tau_min, tau_max = torch.aminmax(taus)
    return _EpochStats(
        loss=float(loss_values.mean()),
        tau_mean=float(taus.mean()),
        tau_min=float(tau_min),
        tau_max=float(tau_max),
    )


def _diverged(run: _DatasetRun, epoch: int, what: str) -> _EpochStats:
    reason = (f"{what} in epoch {epoch} after {run.step} optimizer steps on dataset "
              f"{run.name!r}; lower training.lr or check the schedule values and the data")
    logger.warning("trial diverged: %s", reason)
    nan = float("nan")
    return _EpochStats(loss=nan, tau_mean=nan, tau_min=nan, tau_max=nan, diverged=reason)


def _embed(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
           batch_size: int) -> torch.Tensor:
    parts = [encode(inputs[start : start + batch_size])
             for start in range(0, inputs.shape[0], batch_size)]
    return torch.cat(parts)


def _evaluate(run: _DatasetRun, eval_batch_size: int) -> dict[str, float]:
    """Compute the test-split metrics of one dataset's current model."""
    from mmts_search.metrics import class_relevance_metrics, head_mid_tail_metrics

    test = run.data.test
    run.model.eval()
    try:
        with torch.no_grad():
            item_emb = _embed(run.model.encode_items, test.item_inputs, eval_batch_size)
            text_emb = _embed(run.model.encode_texts, test.text_inputs, eval_batch_size)
    finally:
        run.model.train()

    metrics = head_mid_tail_metrics(
        item_emb, text_emb, test.text_to_item, test.counts,
        reference_freq=run.train_counts, include_overall=True,
    )
    if run.data.has_labels:
        # NOTE: mAP and nDCG sort every query's full ranking, so they dominate evaluation
        # for test splits beyond some 10^4 items (synthetic-lt with millions of items).
        metrics.update(class_relevance_metrics(item_emb, text_emb, test.item_labels,
                                               test.text_labels))
    return {key: float(value) for key, value in metrics.items()}


def _dataset_report(run: _DatasetRun, stats: _EpochStats,
                    metrics: dict[str, float]) -> dict[str, float]:
    report: dict[str, float] = {"loss": stats.loss}
    report.update(metrics)
    report.update(tau_mean=stats.tau_mean, tau_min=stats.tau_min, tau_max=stats.tau_max,
                  lr=float(run.lr_scheduler.get_last_lr()[0]))
    return report


def aggregate_values(values: list[float], weights: list[float], how: str) -> float:
    """Aggregate one metric over datasets: ``mean``, ``min``, ``median`` or ``weighted_mean``."""
    if how == "mean":
        return float(statistics.fmean(values))
    if how == "min":
        return float(min(values))
    if how == "median":
        return float(statistics.median(values))
    if how == "weighted_mean":
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"dataset weights must add up to more than 0 but got {weights}")
        return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)
    raise ValueError(f"objective.aggregate must be mean, min, median or weighted_mean but "
                     f"got {how!r}")


def combine_reports(per_dataset: dict[str, dict[str, float]], weights: dict[str, float],
                    how: str) -> dict[str, float]:
    """Merge per-dataset metrics: the aggregate under each plain name, then ``name/key``.

    With one dataset the metrics are returned unchanged, without prefixes. A metric that
    only some datasets report (``map`` without labels) is aggregated over those.
    """
    if len(per_dataset) == 1:
        return dict(next(iter(per_dataset.values())))

    keys: dict[str, None] = {}
    for metrics in per_dataset.values():
        keys.update(dict.fromkeys(metrics))
    combined: dict[str, float] = {}
    for key in keys:
        present = [name for name, metrics in per_dataset.items() if key in metrics]
        combined[key] = aggregate_values([per_dataset[name][key] for name in present],
                                         [weights[name] for name in present], how)
    for name, metrics in per_dataset.items():
        for key, value in metrics.items():
            combined[f"{name}/{key}"] = value
    return combined


def objective_metrics(spec: SweepSpec) -> list[str]:
    """Return the objective metric names of the sweep file (one, or several for nsga2)."""
    metric = spec.objective.metric
    return [metric] if isinstance(metric, str) else list(metric)


# --------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _checkpoint_state(runs: list[_DatasetRun], epoch: int, history: list[dict[str, Any]],
                      family: str, params: dict[str, Any]) -> dict[str, Any]:
    datasets = {}
    for run in runs:
        schedule_state = run.schedule.state_dict() if isinstance(run.schedule, nn.Module) else {}
        datasets[run.name] = {
            "model": run.model.state_dict(),
            "schedule": schedule_state,
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "generator": run.generator.get_state(),
            "step": run.step,
        }
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "family": family,
        "params": {key: float(value) for key, value in params.items()},
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "datasets": datasets,
    }


def _restore(state: dict[str, Any], runs: list[_DatasetRun], family: str,
             params: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint into freshly built runs; returns (last epoch, history)."""
    saved_params = {key: float(value) for key, value in params.items()}
    if state["family"] != family or state["params"] != saved_params:
        raise ValueError(
            f"the checkpoint belongs to family {state['family']!r} with {state['params']}, "
            f"not to this trial's {family!r} with {saved_params}; use an empty checkpoint "
            f"folder for a different configuration"
        )
    names = sorted(run.name for run in runs)
    if sorted(state["datasets"]) != names:
        raise ValueError(f"the checkpoint contains datasets {sorted(state['datasets'])}, but "
                         f"this trial has {names}")

    for run in runs:
        saved = state["datasets"][run.name]
        run.model.load_state_dict(saved["model"])
        if isinstance(run.schedule, nn.Module):
            run.schedule.load_state_dict(saved["schedule"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        run.generator.set_state(saved["generator"])
        run.step = int(saved["step"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["epoch"]), list(state["history"])


def _tracking_params(spec: SweepSpec, family: str, params: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {"family": family, **params}
    values.update({
        "loss": spec.loss,
        "datasets": ",".join(ds.name for ds in spec.datasets),
        "model.kind": spec.model.kind,
        "model.embed_dim": spec.model.embed_dim,
        "training.epochs": spec.training.epochs,
        "training.batch_size": spec.training.batch_size,
        "training.lr": spec.training.lr,
        "training.weight_decay": spec.training.weight_decay,
        "training.warmup_fraction": spec.training.warmup_fraction,
        "training.seed": spec.training.seed,
    })
    return values


def _diverged_report(epoch: int, reason: str, spec: SweepSpec,
                     last: dict[str, Any] | None) -> dict[str, Any]:
    """Build the final report of a diverged trial: every usual metric NaN, plus the reason."""
    report: dict[str, Any] = {"epoch": float(epoch)}
    names = list(last) if last else [*STANDARD_METRICS, *objective_metrics(spec)]
    for name in names:
        if name not in ("epoch", "diverged", "error"):
            report[name] = float("nan")
    report["objective"] = float("nan")
    report["diverged"] = 1.0
    report["error"] = reason
    return report


def _execute(
    spec: SweepSpec,
    family: str,
    params: dict[str, Any],
    *,
    trial_id: str,
    run_context: dict[str, Any] | None,
    local_dir: Path,
    restored: dict[str, Any] | None,
    publish: PublishCallback,
    extra_params: dict[str, Any],
) -> list[dict[str, Any]]:
    """Run the trial: open tracking, build, train, evaluate, report, checkpoint, finish."""
    from mmts_search import tracking

    trial_run = tracking.open_trial_run(
        run_context, trial_id=trial_id,
        params={**_tracking_params(spec, family, params), **extra_params},
        local_dir=local_dir,
    )
    logger.info("trial %s starts: family %s, params %s, datasets %s (MLflow run %s)",
                trial_id, family, params, [ds.name for ds in spec.datasets],
                getattr(trial_run, "run_id", None))

    threads_before = torch.get_num_threads()
    try:
        history, diverged = _train_and_report(spec, family, params, trial_run=trial_run,
                                              restored=restored, publish=publish)
    except SystemExit:
        # Ray Tune stops a trial (for example a pruned one) with SystemExit inside
        # tune.report. The driver marks such runs, so this only sends buffered metrics.
        trial_run.finish("KILLED")
        raise
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        # The caller gets the traceback with the re-raised error; a log line is enough.
        logger.error("trial %s failed: %s", trial_id, message)
        trial_run.finish("FAILED", {"error": tracking.redact(message)[:5000]})
        raise
    finally:
        torch.set_num_threads(threads_before)

    if diverged is not None:
        trial_run.finish("FAILED", {"error": tracking.redact(diverged)[:5000]})
    else:
        trial_run.finish("FINISHED")
    logger.info("trial %s ended after %d epoch(s)%s", trial_id, len(history),
                f": {diverged}" if diverged else "")
    return history


def _train_and_report(
    spec: SweepSpec,
    family: str,
    params: dict[str, Any],
    *,
    trial_run: Any,
    restored: dict[str, Any] | None,
    publish: PublishCallback,
) -> tuple[list[dict[str, Any]], str | None]:
    """Train all epochs; returns (reports of all epochs, divergence reason or None)."""
    device = resolve_device(spec.training.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(math.ceil(float(spec.resources.cpu)))))
    _seed_everything(int(spec.training.seed))

    runs = [_build_run(ds, index, spec, family, params, device)
            for index, ds in enumerate(spec.datasets)]
    fingerprints = {ds.name: fingerprint_dataset(ds) for ds in spec.datasets}
    if any(fingerprints.values()):
        trial_run.log_dict(fingerprints, "data_fingerprints.json")

    first_epoch, history = 0, []
    if restored is not None:
        first_epoch, history = _restore(restored, runs, family, params)
    elif family != "learnable":
        # A fixed schedule is known before training, so pruned trials get its plot too.
        _log_schedule_plots(spec, family, runs, trial_run)

    loss_fn = _loss_function(spec.loss)
    weights = {ds.name: float(ds.weight) for ds in spec.datasets}
    eval_batch_size = int(spec.training.eval_batch_size)
    diverged: str | None = None

    for epoch in range(first_epoch + 1, int(spec.training.epochs) + 1):
        per_dataset: dict[str, dict[str, float]] = {}
        for run in runs:
            stats = _train_epoch(run, loss_fn, epoch)
            if stats.diverged is not None:
                diverged = stats.diverged
                break
            per_dataset[run.name] = _dataset_report(run, stats,
                                                    _evaluate(run, eval_batch_size))
        if diverged is not None:
            report = _diverged_report(epoch, diverged, spec, history[-1] if history else None)
            history.append(report)
            trial_run.log_metrics(_numeric(report), step=epoch)
            publish(report, None)
            break

        report = {"epoch": float(epoch)}
        report.update(combine_reports(per_dataset, weights, spec.objective.aggregate))
        report.update(_objective_values(report, spec))
        report["diverged"] = 0.0
        history.append(report)

        # Log before publishing: Tune stops a pruned trial inside `publish`.
        trial_run.log_metrics(_numeric(report), step=epoch)
        publish(report, _checkpoint_state(runs, epoch, history, family, params))

    _log_final_artifacts(spec, family, params, runs, history, trial_run, diverged)
    return history, diverged


def _objective_values(report: dict[str, float], spec: SweepSpec) -> dict[str, float]:
    names = objective_metrics(spec)
    missing = [name for name in names if name not in report]
    if missing:
        raise ValueError(
            f"objective.metric {missing[0]!r} is not reported by this trial; available "
            f"metrics: {', '.join(key for key in report if '/' not in key)} (map, ndcg and "
            f"cls_* need concept labels)"
        )
    return {"objective": report[names[0]]}


def _numeric(report: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in report.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def schedule_curves(run: _DatasetRun, *, max_points: int = 1000) -> tuple[np.ndarray,
                                                                           dict[str, np.ndarray]]:
    """Evaluate the schedule over all training steps for one head, mid and tail sample.

    The samples are the training captions with the median count of each concept group
    (`mmts_search.metrics.concept_groups` on the training counts). At most
    ``max_points`` evenly spaced steps are evaluated.

    Returns:
        (steps, {"head (count 144)": temperatures, ...}); a group without samples is left
        out.
    """
    from mmts_search.metrics import concept_groups

    groups = concept_groups(run.train_counts)
    picked: dict[str, float] = {}
    for group_id, group in enumerate(("head", "mid", "tail")):
        counts = run.train_counts[groups == group_id]
        if counts.size:
            count = float(np.sort(counts)[(counts.size - 1) // 2])
            picked[f"{group} (count {count:g})"] = count

    steps = np.unique(np.linspace(0, run.total_steps - 1, min(run.total_steps, max_points))
                      .round().astype(np.int64))
    device = run.data.train.counts.device
    counts_tensor = torch.tensor(list(picked.values()), dtype=torch.float32, device=device)
    with torch.no_grad():
        values = np.stack([run.schedule.temperature(int(step), counts_tensor).cpu().numpy()
                           for step in steps])
    return steps, {label: values[:, column] for column, label in enumerate(picked)}


def _log_schedule_plots(spec: SweepSpec, family: str, runs: list[_DatasetRun],
                        trial_run: Any) -> None:
    """Log the temperature (or margin) over training of each dataset as a PNG."""
    from mmts_search import tracking

    ylabel = "margin" if spec.loss == "max_margin" else "temperature"
    for run in runs:
        steps, curves = schedule_curves(run)
        figure = tracking.plot_schedule(steps, curves, ylabel=ylabel,
                                        title=f"{family} schedule on {run.name}")
        trial_run.log_figure(figure, "schedule.png" if len(runs) == 1
                             else f"schedule_{run.name}.png")


def _log_final_artifacts(spec: SweepSpec, family: str, params: dict[str, Any],
                         runs: list[_DatasetRun], history: list[dict[str, Any]],
                         trial_run: Any, diverged: str | None) -> None:

    if family == "learnable":
        # NOTE: this plot shows the final learned temperature as a flat line. The per-epoch
        # tau_mean, tau_min and tau_max metrics show how it moved during training.
        _log_schedule_plots(spec, family, runs, trial_run)

    trial_run.log_dict(_json_safe({
        "config": {"family": family, **params},
        "final": history[-1] if history else {},
        "epochs": history,
        "diverged": diverged,
    }), "final_metrics.json")

    if spec.training.save_model and diverged is None:
        for run in runs:
            name = "model.safetensors" if len(runs) == 1 else f"model_{run.name}.safetensors"
            state = {key: value.detach().cpu().contiguous()
                     for key, value in run.model.state_dict().items()}
            trial_run.log_state_dict(state, name)


# --------------------------------------------------------------------------------------
# Console output of run_single_trial
# --------------------------------------------------------------------------------------

# Metric shown in each column of the live table, with its header.
_TABLE_COLUMNS = (("epoch", "epoch"), ("loss", "loss"), ("rsum", "rsum"),
                  ("head_rsum", "head"), ("mid_rsum", "mid"), ("tail_rsum", "tail"),
                  ("map", "mAP"), ("tau_mean", "tau"), ("objective", "objective"))


def _epoch_table(spec: SweepSpec) -> Any:
    from rich.table import Table

    table = Table(title=f"{spec.name}: one trial, {spec.training.epochs} epochs",
                  caption="head/mid/tail: rsum per concept group; tau: mean temperature")
    for _, header in _TABLE_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    return table


def _epoch_row(metrics: dict[str, Any]) -> list[str]:
    cells = []
    for key, _ in _TABLE_COLUMNS:
        value = metrics.get(key)
        if value is None:
            cells.append("-")
        elif key == "epoch":
            cells.append(str(int(value)))
        elif key in ("loss", "tau_mean"):
            cells.append(f"{value:.4f}")
        else:
            cells.append(f"{value:.2f}")
    return cells


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None so that the result is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
