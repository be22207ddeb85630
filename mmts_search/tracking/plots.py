"""Figures logged to MLflow: schedule curves, Optuna study plots, head/mid/tail bars."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import optuna
    import pandas as pd

logger = logging.getLogger(__name__)

GROUP_COLUMNS = ("head_rsum", "mid_rsum", "tail_rsum")


def plot_schedule(
    steps: Sequence[int] | np.ndarray,
    curves: Mapping[str, Sequence[float] | np.ndarray],
    *,
    ylabel: str,
    title: str | None = None,
) -> Figure:
    """Plot a temperature (or margin) schedule over training steps, one curve per sample.

    The worker passes one curve each for a head, a mid and a tail sample, for example
    ``{"head (count 812)": ..., "mid (count 40)": ..., "tail (count 2)": ...}``.

    Args:
        steps: (T,) optimizer steps.
        curves: label to (T,) values at those steps (temperature or margin).
        ylabel: y-axis label, for example ``"temperature"`` or ``"margin"``.
        title: optional figure title.

    Returns:
        A matplotlib Figure made without pyplot (no global state, safe in threads).

    Raises:
        ValueError: when a curve's length differs from ``steps`` or no curve is given.
    """
    x = np.asarray(steps)
    if x.ndim != 1:
        raise ValueError(f"steps must be one-dimensional (T,) but has shape {x.shape}")
    if not curves:
        raise ValueError("curves is empty; pass at least one label -> values pair")

    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.add_subplot()
    for label, values in curves.items():
        y = np.asarray(values, dtype=float)
        if y.shape != x.shape:
            raise ValueError(f"curve {label!r} has shape {y.shape} but steps has {x.shape}")
        axes.plot(x, y, label=label, linewidth=1.5)

    axes.set_xlabel("training step (optimizer updates)")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_head_mid_tail(best: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Draw grouped bars of head, mid and tail rsum for one trial per schedule family.

    Args:
        best: one row per family with columns ``family``, ``head_rsum``, ``mid_rsum``,
            ``tail_rsum`` and optionally ``trial_id`` and ``status``.
        title: figure title.

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: when a required column is missing or ``best`` is empty.
    """
    missing = [column for column in ("family", *GROUP_COLUMNS) if column not in best.columns]
    if missing:
        raise ValueError(f"leaderboard lacks columns {missing} needed for the head/mid/tail "
                         "chart")
    if best.empty:
        raise ValueError("no trial with head/mid/tail rsum to plot")

    labels = []
    for _, row in best.iterrows():
        label = str(row["family"])
        if "trial_id" in best.columns:
            label += f"\n{row['trial_id']}"
        if "status" in best.columns and str(row["status"]) not in ("COMPLETE", "nan"):
            label += f" ({str(row['status']).lower()})"
        labels.append(label)

    figure = Figure(figsize=(max(6.0, 1.8 * len(labels) + 2), 4.5))
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    width = 0.26
    for offset, column in zip((-width, 0.0, width), GROUP_COLUMNS, strict=True):
        values = best[column].astype(float).to_numpy()
        bars = axes.bar(positions + offset, values, width, label=column.replace("_rsum", ""))
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)

    axes.set_xticks(positions, labels)
    axes.set_ylabel("rsum (sum of recalls, %)")
    axes.set_title(title or "head / mid / tail rsum of the best trial per schedule family")
    axes.legend(title="concept frequency")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _figure_of(result: Any) -> Any:
    """Return the matplotlib Figure behind the Axes (or array of Axes) Optuna returns."""
    if hasattr(result, "figure"):
        return result.figure
    return np.asarray(result).flat[0].figure


def write_optuna_plots(
    study: optuna.Study,
    out_dir: Path,
    *,
    include_plotlyjs: str | bool = "cdn",
) -> tuple[list[Path], list[str]]:
    """Write the Optuna plots of ``study`` as HTML (plotly) and PNG (matplotlib).

    Single-objective studies get the optimization history, parameter importances,
    parallel coordinates and intermediate values. Multi-objective studies get the Pareto
    front and the parallel coordinates of the first objective. A plot the study cannot
    support (no complete trial, fewer than 2 complete trials for importances, no
    intermediate values, more than 3 objectives for the Pareto front) is skipped with a
    reason. PNGs come from ``optuna.visualization.matplotlib``, which needs no browser.

    Args:
        study: the Optuna study of the sweep.
        out_dir: folder for ``optuna_<plot>.html`` and ``optuna_<plot>.png``.
        include_plotlyjs: passed to plotly's ``write_html``; ``"cdn"`` keeps files small
            but needs a network connection to view, ``True`` embeds plotly (~3.5 MB).

    Returns:
        ``(written files, reasons for skipped plots)``.
    """
    import optuna
    import optuna.visualization as plotly_vis
    import optuna.visualization.matplotlib as mpl_vis
    from matplotlib import pyplot
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    with_intermediate = [trial for trial in trials if trial.intermediate_values]
    multi = len(study.directions) > 1
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]

    plots: list[tuple[str, str | None, dict[str, Any]]] = []
    if multi:
        pareto_reason = None
        if not complete:
            pareto_reason = "no complete trial"
        elif len(study.directions) > 3:
            pareto_reason = f"{len(study.directions)} objectives (at most 3 can be drawn)"
        plots.append(("pareto_front", pareto_reason, {"target_names": names}
                      if len(names) == len(study.directions) else {}))
        plots.append(("parallel_coordinate", None if complete else "no complete trial",
                      {"target": lambda trial: trial.values[0], "target_name": names[0]}))
    else:
        plots.append(("optimization_history", None if complete else "no complete trial", {}))
        plots.append((
            "param_importances",
            None if len(complete) >= 2 else
            f"{len(complete)} complete trial(s); importances need at least 2", {},
        ))
        plots.append(("parallel_coordinate", None if complete else "no complete trial", {}))
        plots.append(("intermediate_values", None if with_intermediate else
                      "no trial reported intermediate values", {}))

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[str] = []
    for name, reason, kwargs in plots:
        if reason is not None:
            skipped.append(f"optuna {name}: skipped, {reason}")
            continue

        plot_functions: list[tuple[str, Callable[..., Any]]] = [
            ("html", getattr(plotly_vis, f"plot_{name}")),
            ("png", getattr(mpl_vis, f"plot_{name}")),
        ]
        for extension, function in plot_functions:
            path = out_dir / f"optuna_{name}.{extension}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    result = function(study, **kwargs)
                if extension == "html":
                    result.write_html(str(path), include_plotlyjs=include_plotlyjs)
                else:
                    figure = _figure_of(result)
                    figure.savefig(path, dpi=120, bbox_inches="tight")
                    pyplot.close(figure)
                written.append(path)
            except (ValueError, RuntimeError, TypeError, KeyError, IndexError,
                    ZeroDivisionError) as error:
                skipped.append(f"optuna {name} ({extension}): {type(error).__name__}: {error}")
    return written, skipped
