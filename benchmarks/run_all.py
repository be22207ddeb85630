"""Run every benchmark script, print one line per measured ratio, and record the run.

Each script runs in its own Python process, so that one benchmark's memory and threads
do not affect the next, and writes its results as JSON. This script collects them,
prints every checked value as ``name: value (target ...) PASS/FAIL``, and exits with
status 1 when a target is missed or a script fails. With ``--write-results`` it also
writes ``benchmarks/RESULTS.md``: the machine, the command and the numbers of this run.

Run: ``python benchmarks/run_all.py [--write-results] [--only losses metrics ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCHMARKS_DIR, DEFAULT_THREADS, PROJECT_ROOT, Check, machine_info

# In the order they run: the cheap, self-contained ones first, the sweeps last.
BENCHMARKS = ("losses", "train_step", "metrics", "concepts", "scale", "sweep", "pruning")
RESULTS_PATH = BENCHMARKS_DIR / "RESULTS.md"

METHODS = """\
## How the numbers are measured

- Times: `time.perf_counter`, warm-up rounds first. In each round a candidate and its
  references run once each, one after the other in the same process, so that load from
  other processes hits them alike. Seconds are medians over rounds, and a ratio is the
  median of the per-round ratios. On CUDA every timed call ends with
  `torch.cuda.synchronize`. The targets apply to the ratios, because absolute times on a
  shared machine vary from run to run.
- Load: each section gives the 1-minute load average before and after its benchmark.
  When it is above the number of cores, other processes take CPU time from torch's
  threads, each parallel kernel waits for its slowest thread, and ratios drift by tens
  of percent. Rerun on a quiet machine before reading a FAIL near its target.
- Threads: `torch.set_num_threads(THREADS)` in every benchmark process (option
  `--threads`); scikit-learn's pools are limited to the same count with `threadpoolctl`.
  Ray trials set their own thread count (one per trial CPU).
- Peak memory on CPU: each measured call runs in a fresh subprocess. After a warm-up
  call the child returns freed heap pages to the system (glibc `malloc_trim(0)`), resets
  the kernel's resident-set high-water mark (`5` written to `/proc/self/clear_refs`),
  runs the measured call and reads `VmHWM` from `/proc/self/status`; the peak is
  `VmHWM` minus the resident set just before the call. `tracemalloc` is not used because
  torch's CPU tensors are allocated with malloc, outside Python's allocator. On CUDA the
  peak is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the
  bytes allocated before the call.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                        help="run only these benchmarks (default: all)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch threads per benchmark process (default {DEFAULT_THREADS})")
    parser.add_argument("--write-results", nargs="?", const=RESULTS_PATH, default=None,
                        type=Path, metavar="PATH",
                        help=f"write the results page (default path {RESULTS_PATH})")
    return parser.parse_args(argv)


def run_benchmark(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Run ``bench_<name>.py`` in a subprocess and return its JSON report.

    A script that exits without writing its report (a crash) yields a report with an
    ``error`` entry, which counts as a failure.
    """
    json_path = folder / f"{name}.json"
    command = [sys.executable, str(BENCHMARKS_DIR / f"bench_{name}.py"),
               "--device", args.device, "--threads", str(args.threads), "--json", str(json_path)]
    print(f"\n=== {name}: {shlex.join(command[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=PROJECT_ROOT, check=False)
    seconds = time.perf_counter() - started
    if json_path.is_file():
        report = json.loads(json_path.read_text())
    else:
        report = {"benchmark": name, "checks": [], "notes": [], "skipped": None, "settings": {}}
    report["wall_seconds"] = seconds
    report["load_average"] = (load_before, os.getloadavg()[0])
    report["exit_code"] = completed.returncode
    failed_checks = [check for check in report["checks"] if check.get("passed") is False]
    if completed.returncode != 0 and not failed_checks:
        report["error"] = f"bench_{name}.py exited with status {completed.returncode}"
    return report


def to_check(entry: dict[str, Any]) -> Check:
    """Rebuild a `Check` from its JSON form."""
    return Check(name=entry["name"], value=entry["value"], unit=entry.get("unit", ""),
                 op=entry.get("op"), target=entry.get("target"), note=entry.get("note", ""))


def summarize(reports: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Return the summary lines (every value with a target, then errors) and success."""
    lines: list[str] = []
    ok = True
    for report in reports:
        if report.get("skipped"):
            lines.append(f"{report['benchmark']}: SKIPPED ({report['skipped']})")
        for entry in report["checks"]:
            check = to_check(entry)
            if check.passed is not None:
                lines.append(check.line())
                ok = ok and bool(check.passed)
        if "error" in report:
            lines.append(f"{report['benchmark']}: ERROR ({report['error']})")
            ok = False
    return lines, ok


def results_markdown(reports: list[dict[str, Any]], args: argparse.Namespace, command: str,
                     total_seconds: float, ok: bool) -> str:
    """Format the results page: machine, command, per-benchmark tables and notes."""
    info = machine_info()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run_all.py --write-results`; rerun that command to",
        "refresh this page. What each benchmark measures and why is in the docstring at the",
        "top of its script.",
        "",
        "## Latest run",
        "",
        f"- Date: {now}",
        f"- Command: `{command}`",
        f"- CPU: {info.get('cpu')}, {info.get('cores')} cores"
        + (f", {info['memory']} memory" if "memory" in info else ""),
        f"- GPU: {info.get('gpu')}",
        f"- torch {info.get('torch')}, Python {info.get('python')}, "
        f"torch threads {args.threads}, device option `{args.device}`",
        f"- Wall time of the whole run: {total_seconds / 60:.1f} min",
        f"- Verdict: {'every target met' if ok else 'at least one target missed (FAIL below)'}",
        "",
        METHODS.replace("THREADS", str(args.threads)),
    ]
    for report in reports:
        out.append(f"## {report['benchmark']}")
        out.append("")
        wall = report.get("wall_seconds")
        if wall is not None:
            load = report.get("load_average")
            load_text = (f", 1-minute load average {load[0]:.1f} before and {load[1]:.1f} "
                         f"after on {os.cpu_count()} cores" if load else "")
            out.append(f"Wall time {wall:.0f} s{load_text}.")
            out.append("")
        if report.get("skipped"):
            out.append(f"Skipped: {report['skipped']}.")
            out.append("")
        if "error" in report:
            out.append(f"Error: {report['error']}.")
            out.append("")
        if report["checks"]:
            out.append("| measurement | value | target | verdict |")
            out.append("| --- | --- | --- | --- |")
            for entry in report["checks"]:
                check = to_check(entry)
                name = check.name.split(".", 1)[-1]
                unit = f" {check.unit}" if check.unit else ""
                value = f"{_fmt(check.value)}{unit}"
                if check.passed is None:
                    target, verdict = "", ""
                else:
                    target = f"{check.op} {_fmt(check.target)}{unit}"
                    verdict = "PASS" if check.passed else "**FAIL**"
                note = f" ({check.note})" if check.note else ""
                out.append(f"| `{name}`{note} | {value} | {target} | {verdict} |")
            out.append("")
        for note in report.get("notes", []):
            out.append(f"- {note}")
        if report.get("notes"):
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _fmt(value: float | None) -> str:
    from common import format_value

    return format_value(value)


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and return 1 when a target is missed or a script fails."""
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/run_all.py", *(argv if argv is not None
                                                                else sys.argv[1:])])
    started = time.perf_counter()
    reports = []
    with tempfile.TemporaryDirectory(prefix="mmts-bench-") as folder:
        for name in args.only:
            reports.append(run_benchmark(name, args, Path(folder)))
    total = time.perf_counter() - started

    lines, ok = summarize(reports)
    print("\n=== summary", flush=True)
    for line in lines:
        print(line)
    print(f"total {total / 60:.1f} min: {'all targets met' if ok else 'TARGETS MISSED'}")

    if args.write_results is not None:
        path = Path(args.write_results)
        path.write_text(results_markdown(reports, args, command, total, ok))
        print(f"results written to {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
