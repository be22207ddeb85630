"""Shared helpers of the benchmark scripts: timing, peak memory, checks and output.

Every script measures a candidate against a reference in the same process run and
reports the ratio, because the machines these run on are shared and absolute times
alone mean little. A ratio is the median of per-round ratios (`Timings.ratio`). A check
prints one line, ``name: value (target ...) PASS/FAIL``, and a script exits with status 1
when any check fails.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  bytes allocated before the measured call.
- CPU: the measured call runs in a fresh ``spawn`` subprocess. The child builds its
  inputs and runs the call once to warm up. It then returns freed heap pages to the
  system with glibc ``malloc_trim(0)`` and resets the kernel's resident-set high-water
  mark (writing ``5`` to ``/proc/self/clear_refs``). Last, it runs the call again and
  reads ``VmHWM`` from ``/proc/self/status``. The peak is ``VmHWM`` minus ``VmRSS`` just
  before that call.
  Torch's CPU allocations go through malloc, not through Python's allocator, so
  ``tracemalloc`` would not see them; the resident set does. Where the high-water mark
  cannot be reset, the child's ``ru_maxrss`` is used instead, which is an upper bound.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS_DIR.parent
DEFAULT_THREADS = 2
MIB = 1024**2
GIB = 1024**3


def shared_data_dir() -> Path | None:
    """Return the real-data folder (``MMTS_SHARED_DATA``, else ``shared/data`` beside the project).

    Returns None when the folder does not exist.
    """
    configured = os.environ.get("MMTS_SHARED_DATA")
    path = Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------
# Checks and output
# ---------------------------------------------------------------------------


@dataclass
class Check:
    """One measured value, with an optional target it must meet.

    ``op`` is ``"<="`` or ``">="``; with ``target`` None the value is only reported.
    """

    name: str
    value: float
    unit: str = ""
    op: str | None = None
    target: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """True or False against the target, None when the value has no target."""
        if self.target is None or self.op is None:
            return None
        if self.value != self.value:  # NaN never meets a target
            return False
        if self.op == "<=":
            return self.value <= self.target
        if self.op == ">=":
            return self.value >= self.target
        raise ValueError(f"check {self.name}: op must be '<=' or '>=' but got {self.op!r}")

    def line(self) -> str:
        """Format the check as ``name: value (target ...) PASS/FAIL``."""
        value = format_value(self.value)
        unit = f" {self.unit}" if self.unit else ""
        if self.passed is None:
            text = f"{self.name}: {value}{unit} (no target)"
        else:
            verdict = "PASS" if self.passed else "FAIL"
            text = (f"{self.name}: {value}{unit} (target {self.op} "
                    f"{format_value(self.target)}{unit}) {verdict}")
        if self.note:
            text += f"  [{self.note}]"
        return text


def format_value(value: float | None) -> str:
    """Format a number with about four significant digits."""
    if value is None:
        return "n/a"
    if value != value:
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


@dataclass
class Report:
    """The checks and notes of one benchmark script, printed as they arrive."""

    benchmark: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, value: float, *, unit: str = "", op: str | None = None,
            target: float | None = None, note: str = "") -> Check:
        """Record a value (and its target) under ``<benchmark>.<name>`` and print its line."""
        check = Check(f"{self.benchmark}.{name}", float(value), unit, op, target, note)
        self.checks.append(check)
        print(check.line(), flush=True)
        return check

    def note(self, text: str) -> None:
        """Record and print a line of context (a definition, a cause, a skip reason)."""
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def skip(self, reason: str) -> None:
        """Mark the whole benchmark as skipped, with the reason."""
        self.skipped = reason
        print(f"{self.benchmark}: SKIPPED ({reason})", flush=True)

    @property
    def failed(self) -> list[Check]:
        """The checks that missed their target."""
        return [check for check in self.checks if check.passed is False]

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (``passed`` included per check)."""
        data = asdict(self)
        for entry, check in zip(data["checks"], self.checks, strict=True):
            entry["passed"] = check.passed
        return data


def base_parser(description: str) -> argparse.ArgumentParser:
    """Return an argument parser with the options every benchmark script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch intra-op threads (default {DEFAULT_THREADS})")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results as JSON to this file")
    return parser


def finish(report: Report, started: float, json_path: Path | None) -> int:
    """Print the verdict, write the JSON file when asked, and return the exit status."""
    report.seconds = time.perf_counter() - started
    failed = report.failed
    if report.skipped:
        verdict = "skipped"
    elif failed:
        verdict = f"{len(failed)} target(s) missed"
    else:
        verdict = "all targets met"
    print(f"{report.benchmark}: {verdict} in {report.seconds:.1f} s", flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_json(), indent=2))
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# Device, threads and timing
# ---------------------------------------------------------------------------


def setup_torch(device_name: str, threads: int) -> Any:
    """Fix torch's thread count and return the ``torch.device`` to run on.

    ``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``.
    """
    import torch

    torch.set_num_threads(threads)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device_name)


def synchronize(device: Any) -> None:
    """Wait for queued GPU work on ``device``; does nothing on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """Seconds per call of several functions, measured round by round.

    ``samples[name][r]`` is the time of ``name`` in round ``r``; all functions ran once
    in every round, close together in time.
    """

    def __init__(self, samples: dict[str, list[float]]) -> None:
        self.samples = samples

    def __getitem__(self, name: str) -> float:
        """Return the median seconds per call of ``name``."""
        return statistics.median(self.samples[name])

    def items(self) -> list[tuple[str, float]]:
        """Return (name, median seconds) pairs."""
        return [(name, self[name]) for name in self.samples]

    def ratio(self, numerator: str, denominator: str) -> float:
        """Return the median over rounds of ``numerator`` time / ``denominator`` time.

        Both calls of a round ran within a fraction of a second of each other, so a burst
        of load from another process changes both, and the per-round ratio is steadier
        than a ratio of two medians.
        """
        pairs = zip(self.samples[numerator], self.samples[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)


def time_interleaved(functions: dict[str, Callable[[], Any]], *, device: Any,
                     warmup: int = 2, repeats: int = 7) -> Timings:
    """Time every function once per round, for ``warmup`` untimed and ``repeats`` timed rounds.

    The functions run in turn (A, B, C, then B, C, A, ...), so that load from other
    processes on a shared machine hits candidate and reference alike, and no function
    always runs first.
    """
    names = list(functions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            functions[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed)
    return Timings(samples)


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int:
    """Return this process's resident set size in bytes."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def release_freed_heap() -> None:
    """Return freed malloc pages to the system (glibc ``malloc_trim``), where available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark; return False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Return the resident-set high-water mark (``VmHWM``, else ``ru_maxrss``) in bytes."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


class PeakMemory:
    """Context manager that measures the peak extra memory of the code inside it.

    On CUDA it reads the allocator's peak. On CPU it reads the resident set's high-water
    mark, which is exact only in a fresh process (see the module docstring). After the
    block, ``peak_bytes`` is the peak minus the usage at entry, and ``method`` names the
    counter that was read.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""
        self._baseline = 0

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            release_freed_heap()
            reset = reset_peak_rss()
            self._baseline = current_rss_bytes()
            self.method = "VmHWM after clear_refs" if reset else "ru_maxrss (upper bound)"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_rss_bytes()
        self.peak_bytes = max(0, peak - self._baseline)


def _child_entry(target: Callable[..., dict[str, Any]], kwargs: dict[str, Any],
                 queue: Any) -> None:
    try:
        queue.put(("ok", target(**kwargs)))
    except BaseException as error:  # reported to the parent, which raises
        queue.put(("error", f"{type(error).__name__}: {error}"))


def run_in_subprocess(target: Callable[..., dict[str, Any]], timeout: float = 900,
                      **kwargs: Any) -> dict[str, Any]:
    """Run ``target(**kwargs)`` in a fresh ``spawn`` process and return its dict result.

    ``target`` must be a module-level function; it usually wraps its measured call in
    :class:`PeakMemory`. Raises ``RuntimeError`` when the child fails or times out.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child_entry, args=(target, kwargs, queue))
    process.start()
    try:
        status, payload = queue.get(timeout=timeout)
    except Exception as error:  # queue.Empty on timeout
        process.kill()
        process.join()
        raise RuntimeError(f"{target.__name__} timed out after {timeout:.0f} s "
                           f"or died (exit code {process.exitcode})") from error
    process.join()
    if status != "ok":
        raise RuntimeError(f"{target.__name__} failed in its subprocess: {payload}")
    return payload


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """Describe the machine: CPU model and cores (``lscpu``), memory, torch, GPU."""
    info: dict[str, str] = {"python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in lscpu.splitlines())
        )
        info["cpu"] = fields.get("Model name", "unknown")
        info["cores"] = fields.get("CPU(s)", str(os.cpu_count()))
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or "unknown"
        info["cores"] = str(os.cpu_count())
    try:
        import psutil

        info["memory"] = f"{psutil.virtual_memory().total / GIB:.1f} GiB"
    except ImportError:
        pass
    import torch

    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def describe(values: Sequence[float]) -> str:
    """Format a short list of numbers for a note."""
    return ", ".join(format_value(value) for value in values)
