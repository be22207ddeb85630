"""Sweep driver: Ray Tune trials, Optuna sampling and pruning, Ray Jobs submission.

Modules:

- `space`: define-by-run Optuna space over schedule families, constraints built in;
- `searcher`: `StudySearch`, Ray's OptunaSearch with a persistent study that records
  pruned and failed trials, and the sampler of each ``search.algorithm``;
- `pruning`: Tune schedulers that let Optuna pruners (or ASHA) stop trials;
- `driver`: `run_sweep` and `resume_sweep`;
- `submit`: submitting a sweep to a Ray cluster through the Ray Jobs API.

The names below are imported lazily, so ``import mmts_search.search`` stays cheap for the
command line's ``--help``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SearchSpace",
    "SearchSpaceError",
    "StudySearch",
    "SweepError",
    "SweepOutcome",
    "resume_sweep",
    "run_sweep",
]

_EXPORTS = {
    "SearchSpace": "mmts_search.search.space",
    "SearchSpaceError": "mmts_search.search.space",
    "StudySearch": "mmts_search.search.searcher",
    "SweepError": "mmts_search.search.driver",
    "SweepOutcome": "mmts_search.search.driver",
    "resume_sweep": "mmts_search.search.driver",
    "run_sweep": "mmts_search.search.driver",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
