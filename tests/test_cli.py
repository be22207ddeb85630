"""The mmts-search command: validate exit codes and output, help texts, user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmts_search.cli import app

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO = PROJECT_ROOT / "search_spaces" / "demo.yaml"
CLI = Path(sys.executable).parent / "mmts-search"

runner = CliRunner()


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def test_validate_valid_file_prints_space() -> None:
    result = invoke("validate", DEMO)

    assert result.exit_code == 0, result.output
    for text in ("Search space of sweep demo", "mmts", "shift_min", "float [0.02, 0.2]",
                 "shift_min >= 0.5 * alpha + 0.001", "tpe, 16 trials", "is valid"):
        assert text in result.output


def test_validate_lists_every_problem_with_exit_2() -> None:
    result = invoke("validate", DEMO, "--set", "search.num_samples=0",
                    "--set", "schedule.alpha.low=-1", "--set", "no_such_key=3")

    assert result.exit_code == 2
    output = result.output
    assert "3 problems" in output
    assert "search.num_samples" in output
    assert "value 0" in output
    assert "schedule.alpha.low" in output
    assert "value -1" in output
    assert "no_such_key" in output
    assert "Traceback" not in output


def test_validate_override_applies() -> None:
    result = invoke("validate", DEMO, "--set", "search.num_samples=4")
    assert result.exit_code == 0
    assert "tpe, 4 trials" in result.output


def test_validate_missing_file_exit_2(tmp_path: Path) -> None:
    result = invoke("validate", tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_validate_malformed_override_exit_2() -> None:
    result = invoke("validate", DEMO, "--set", "training.epochs")
    assert result.exit_code == 2
    assert "training.epochs" in result.output


def test_validate_infeasible_categorical_exit_2(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("""
name: infeasible
datasets: [{name: digits, source: 'builtin:digits-lt'}]
schedule:
  families: [mmts]
  alpha: [0.1, 0.8]
  oscillations: 1
  shift_min: {low: 0.02, high: 0.3}
  shift_max: 0.5
""")
    result = invoke("validate", sweep)

    assert result.exit_code == 2
    assert "Invalid search space" in result.output
    assert "schedule.shift_min" in result.output


def test_validate_grid_counts_points(tmp_path: Path) -> None:
    result = invoke("validate", DEMO, "--set", "search.algorithm=grid",
                    "--set", "schedule.families=[constant]", "--set", "schedule.tau=[0.05, 0.1]")
    assert result.exit_code == 0, result.output
    assert "2 (one per grid point) trials" in result.output


def test_run_missing_file_exit_2(tmp_path: Path) -> None:
    result = invoke("run", tmp_path / "missing.yaml")
    assert result.exit_code == 2


def test_run_unreachable_ray_address_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = invoke("run", DEMO, "--address", f"127.0.0.1:{port}",
                    "--set", f"storage={tmp_path}")

    assert result.exit_code == 1
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_run_rejects_ray_client_address(tmp_path: Path) -> None:
    result = invoke("run", DEMO, "--address", "ray://127.0.0.1:10001",
                    "--set", f"storage={tmp_path}")
    assert result.exit_code == 1
    assert "Ray Client addresses" in result.output


def test_resume_of_plain_folder_exit_1(tmp_path: Path) -> None:
    result = invoke("resume", tmp_path)
    assert result.exit_code == 1
    assert "is not a sweep folder" in result.output
    assert "sweep.yaml" in result.output


def test_report_rejects_unknown_format() -> None:
    result = invoke("report", "--format", "xml")
    assert result.exit_code == 2
    assert "table, csv or json" in result.output


HELP_TEXTS = {
    ("run",): ["--set", "KEY.PATH=VALUE", "--address", "default: 10", "local Ray instance",
               "best.yaml"],
    ("validate",): ["--set", "Exit code 0", "2 with the list of problems"],
    ("resume",): ["<storage>/<name>", "num_samples", "checkpoints"],
    ("submit",): ["http://HEAD:8265", "--wait", "~/.ray/auth_token", "RAY_AUTH_TOKEN"],
    ("trial",): ["--output", "JSON", "midpoint", "Default: the first of schedule.families"],
    ("concepts",): ["--clusters", "Number of concept clusters K", "--seed", "default: 0",
                    "default: tfidf"],
    ("report",): ["--experiment", "default: mmts", "--top", "default: 10", "csv or json",
                  "sqlite:///mlflow.db"],
    ("jobs", "status"): ["--address", "SUCCEEDED"],
    ("jobs", "logs"): ["--follow", "until the job ends"],
    ("jobs", "stop"): ["--address", "resume"],
}


@pytest.mark.parametrize("command", sorted(HELP_TEXTS), ids=" ".join)
def test_help_mentions_units_and_defaults(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in HELP_TEXTS[command]:
        assert expected in text, f"{expected!r} missing from `{' '.join(command)} --help`"


def test_console_script_lists_commands() -> None:
    done = subprocess.run([str(CLI), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("run", "validate", "resume", "submit", "jobs", "trial", "concepts",
                    "report"):
        assert command in done.stdout


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "mmts_search", "validate", str(DEMO)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stdout


def test_report_unknown_experiment_exit_1(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = invoke("report", "--tracking-uri", uri, "--experiment", "no-such-experiment")
    assert result.exit_code == 1
    assert "no-such-experiment" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_run_exits_1_when_no_trial_completes(tmp_path: Path) -> None:
    sweep = tmp_path / "broken.yaml"
    sweep.write_text(
        "name: broken\n"
        f"datasets: [{{name: gone, source: features, path: '{tmp_path / 'missing'}'}}]\n"
        "model: {kind: projection, embed_dim: 16}\n"
        "training: {epochs: 2}\n"
        "schedule: {families: [constant], tau: 0.1}\n"
        "search: {algorithm: random, num_samples: 1, max_concurrent: 1, max_failures: 0}\n"
        "pruner: {kind: none}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
        f"storage: '{tmp_path / 'results'}'\n"
    )

    done = subprocess.run([str(CLI), "run", str(sweep)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)

    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "No trial completed" in done.stdout


def test_secret_scan_survives_concurrent_environment_changes() -> None:
    import os
    import threading

    from mmts_search.tracking._secrets import _secret_env_values

    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["MMTS_TEST_CHURN_TOKEN"] = "churning-value-123"
            os.environ.pop("MMTS_TEST_CHURN_TOKEN", None)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3000):
            _secret_env_values()
    finally:
        stop.set()
        thread.join()
