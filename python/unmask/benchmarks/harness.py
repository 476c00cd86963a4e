"""Shared benchmark harness: median of warmed-up runs, measured peaks, JSON lines.

Timing: CUDA events around each run on a GPU; perf_counter otherwise. Inputs
rotate through several copies larger than the last-level cache where the caller
provides them, so a kernel is never timed on data a previous run left in cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def git_commit(here: Path | None = None) -> str:
    """The commit of the checkout holding `here` (this package by default); UNMASK_COMMIT
    where the tree came without its .git (a GPU machine gets a copy of the working tree)."""
    if os.environ.get("UNMASK_COMMIT"):
        return os.environ["UNMASK_COMMIT"]
    here = here or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        # "-dirty" when the tree differs from the commit, results files aside (a second run
        # appends to the first's): rows then measured code the commit does not hold
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                  ":(exclude,top)bench/results"], capture_output=True, text=True, timeout=5, cwd=here)
        return commit + ("-dirty" if changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[int], object], device: torch.device, *, warmup: int = 3, reps: int = 10,
                   max_seconds: float = 5.0) -> float:
    """Median time of fn(i) over reps runs after warmup runs; i rotates the caller's inputs."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times = []
    budget_end = time.perf_counter() + max_seconds
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - started)
        if len(times) >= 3 and time.perf_counter() > budget_end:
            break
    return statistics.median(times)


def alternating_median_seconds(fns: Sequence[Callable[[int], object]], device: torch.device, *, warmup: int = 3,
                               reps: int = 9, max_seconds: float = 10.0) -> list[float]:
    """Median time of each fn(i), timed in turns (one call of each per round, the order
    reversed every other round): on a shared machine whose speed drifts, back-to-back
    blocks of reps put the drift into the ratio, alternation cancels most of it."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    budget_end = time.perf_counter() + max_seconds
    for i in range(reps):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for index in order:
            started = time.perf_counter()
            fns[index](i)
            synchronize(device)
            times[index].append(time.perf_counter() - started)
        if i >= 2 and time.perf_counter() > budget_end:
            break
    return [statistics.median(t) for t in times]


def read_bandwidth(device: torch.device, *, megabytes: int = 512) -> float:
    """Measured memory read bandwidth in GB/s: a float32 sum over a buffer far larger than cache."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    seconds = median_seconds(lambda i: buffer.sum(), device, warmup=2, reps=7)
    return buffer.numel() * 4 / seconds / 1e9


def copy_bandwidth(device: torch.device, *, megabytes: int = 512) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda i: dst.copy_(src), device, warmup=2, reps=7)
    return 2 * src.numel() * 4 / seconds / 1e9


@dataclasses.dataclass
class Row:
    """One measurement: a JSON line in bench/results/."""

    bench: str
    impl: str
    shape: dict
    dtype: str
    median_ms: float
    gbps: float | None = None
    gflops: float | None = None
    fraction_of_peak: float | None = None
    peak: str | None = None
    speedup_vs_baseline: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def write_rows(rows: Sequence[Row], device: torch.device, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"device": device_name(device), "commit": git_commit(), "torch": torch.__version__,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with out.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({**stamp, **dataclasses.asdict(row)}) + "\n")


def format_table(rows: Sequence[Row]) -> str:
    header = f"{'bench':<10} {'impl':<22} {'shape':<34} {'dtype':<9} {'ms':>9} {'GB/s':>8} {'GFLOP/s':>9} {'of peak':>8} {'speedup':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        lines.append(
            f"{r.bench:<10} {r.impl:<22} {shape:<34} {r.dtype:<9} {r.median_ms:>9.3f} "
            f"{_fmt(r.gbps, '.3g'):>8} {_fmt(r.gflops, '.4g'):>9} {_fmt(r.fraction_of_peak, '.0%'):>8} "
            f"{_fmt(r.speedup_vs_baseline, '.2f'):>8}"
        )
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
