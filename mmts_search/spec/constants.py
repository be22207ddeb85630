"""Metric names, integer and schedule parameters, dataset source fields and name patterns."""

from __future__ import annotations

import re

from mmts_search.schedules import FAMILY_PARAMETERS, SCHEDULE_FAMILIES

_RECALLS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")

REPORTED_METRICS: tuple[str, ...] = (
    "epoch",
    "loss",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "rsum",
    "head_rsum",
    "mid_rsum",
    "tail_rsum",
    "tau_mean",
    "tau_min",
    "tau_max",
    "map",
    "ndcg",
    "objective",
    *(f"{group}_{recall}" for group in ("head", "mid", "tail") for recall in _RECALLS),
    *(f"cls_{recall}" for recall in _RECALLS),
    "cls_rsum",
)
"""Metric names the worker reports after every epoch (recalls and rsum in percent)."""

OBJECTIVE_METRICS: tuple[str, ...] = tuple(
    name for name in REPORTED_METRICS if name not in ("epoch", "objective")
)
"""Reported metrics that an objective may name: all but the epoch counter and itself."""

_LOWER_IS_BETTER = frozenset({"loss", "t2i_medr", "i2t_medr"})

INTEGER_PARAMETERS: frozenset[str] = frozenset({"oscillations"})
"""Schedule parameters that take whole numbers only."""

_SCHEDULE_PARAMETERS: tuple[str, ...] = tuple(
    dict.fromkeys(name for family in SCHEDULE_FAMILIES for name in FAMILY_PARAMETERS[family])
)

# Sources of the built-in and user datasets, and the DatasetSpec fields each one reads.
_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "builtin:digits-lt": ("imbalance_ratio", "test_per_class"),
    "builtin:synthetic-lt": (
        "n_items",
        "dim",
        "n_concepts",
        "zipf_exponent",
        "captions_per_item",
        "noise",
        "test_fraction",
    ),
    "features": ("path", "concepts"),
}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_URL_SCHEME_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_URL_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
_TRACKING_SCHEMES = frozenset(
    {"sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks"}
)
