"""Pydantic models of a sweep file, and loading one from YAML with clear errors.

A sweep file names the datasets, the model, the training budget, the loss, the search space
of the schedule parameters, the search algorithm, the pruner, the objective, the resources of
one trial, the MLflow tracking target and where results go. `load_sweep` reads one and raises
`SweepValidationError` listing every problem at once, each with its dotted key path (for
example ``schedule.tau_min.low``), the bad value, the line in the file where known, and what
is allowed.

A schedule parameter is a range ``{low, high, log?, step?}``, a list of choices or a fixed
value. Three constraints link the parameters, and every helper here respects them:

- ts_cosine: ``tau_min < tau_max``.
- mmts: ``shift_min > alpha / 2``. The temperature ``0.5 * alpha * cos(2*pi*t / T) + shift``
  has its minimum at ``shift_min - alpha / 2``, which must stay positive.
- mmts: ``shift_max >= shift_min``.

Validation guarantees that every listed family has at least one point that satisfies them.
`feasible_param` narrows a parameter to the values that still admit a valid point, given
the values chosen so far, so that a sampler never proposes an invalid point.

Example:
    >>> spec = parse_sweep(
    ...     "name: demo\\ndatasets: [{name: digits, source: 'builtin:digits-lt'}]\\n"
    ...     "loss: infonce\\n",
    ...     overrides=["training.epochs=2"],
    ... )
    >>> spec.training.epochs
    2
"""

from __future__ import annotations

from ._problems import Problem, SweepValidationError
from .api import check_resources, load_sweep, parse_sweep, trial_spec
from .checks import grid_size
from .constants import INTEGER_PARAMETERS, OBJECTIVE_METRICS, REPORTED_METRICS
from .constraints import feasible_param, midpoint_params, point_violations
from .models import (
    ConceptSource,
    DatasetSpec,
    ModelSpec,
    ObjectiveSpec,
    PrunerSpec,
    ResourcesSpec,
    ScheduleSpace,
    SearchSpec,
    SweepSpec,
    TrackingSpec,
    TrainingSpec,
)
from .overrides import apply_overrides
from .params import Param, RangeParam
from .yaml_io import dump_sweep

__all__ = [
    "INTEGER_PARAMETERS",
    "OBJECTIVE_METRICS",
    "REPORTED_METRICS",
    "ConceptSource",
    "DatasetSpec",
    "ModelSpec",
    "ObjectiveSpec",
    "Param",
    "Problem",
    "PrunerSpec",
    "RangeParam",
    "ResourcesSpec",
    "ScheduleSpace",
    "SearchSpec",
    "SweepSpec",
    "SweepValidationError",
    "TrackingSpec",
    "TrainingSpec",
    "apply_overrides",
    "check_resources",
    "dump_sweep",
    "feasible_param",
    "grid_size",
    "load_sweep",
    "midpoint_params",
    "parse_sweep",
    "point_violations",
    "trial_spec",
]
