"""MLflow tracking of sweeps: a parent run per sweep, a child run per trial.

Driver side: `SweepRun.open` (after `preflight`), `SweepRun.run_context` for the
workers, `SweepRun.tune_callback`, `SweepRun.finalize`, `SweepRun.close`.
Worker side: `open_trial_run` and the `TrialRun` it returns, `plot_schedule`.
Terminal: `leaderboard_from_mlflow`, `best_per_family`, `render_report`, and
`import_unsent_metrics` for metrics saved while the server was unreachable.

Every call uses an explicit ``MlflowClient(tracking_uri=...)``; nothing reads or sets
MLflow's global tracking URI or active run. Values pass through `redact` before they
reach params, tags, artifacts or logs.
"""

from mmts_search.tracking._secrets import flatten_params, redact
from mmts_search.tracking._store import (
    DEFAULT_TRACKING_URI,
    TrackingUnavailableError,
    preflight,
    resolve_tracking_uri,
)
from mmts_search.tracking.plots import plot_head_mid_tail, plot_schedule, write_optuna_plots
from mmts_search.tracking.report import (
    LEADERBOARD_COLUMNS,
    best_per_family,
    leaderboard_from_mlflow,
    normalize_leaderboard,
    render_report,
)
from mmts_search.tracking.sweep import SweepRun
from mmts_search.tracking.trial import TrialRun, open_trial_run
from mmts_search.tracking.unsent import UNSENT_METRICS_FILE, import_unsent_metrics

__all__ = [
    "DEFAULT_TRACKING_URI",
    "LEADERBOARD_COLUMNS",
    "UNSENT_METRICS_FILE",
    "SweepRun",
    "TrackingUnavailableError",
    "TrialRun",
    "best_per_family",
    "flatten_params",
    "import_unsent_metrics",
    "leaderboard_from_mlflow",
    "normalize_leaderboard",
    "open_trial_run",
    "plot_head_mid_tail",
    "plot_schedule",
    "preflight",
    "redact",
    "render_report",
    "resolve_tracking_uri",
    "write_optuna_plots",
]
