"""A fixed, short machine benchmark taken at the start and end of every run, so runs can be compared fairly."""
from __future__ import annotations

import os
import time
from typing import Any

import psutil
import torch

MATMUL_SIZE = 512      # 0.27 GFLOP a call: compute-bound, a few ms on one core
COPY_MIB = 64          # larger than any last-level cache: memory-bound
ROUNDS = 7             # median of 7 short timings: each figure takes well under 0.3 s


def _timed(fn: Any, rounds: int = ROUNDS) -> list[float]:
    """Seconds of `rounds` timed calls after one warm-up, in the order they ran."""
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _median_and_spread(times: list[float]) -> tuple[float, float]:
    """Median and relative spread (IQR over median) of the timings."""
    ordered = sorted(times)
    median = ordered[len(ordered) // 2]
    spread = (ordered[(3 * len(ordered)) // 4] - ordered[len(ordered) // 4]) / median if median > 0 else 0.0
    return median, spread


def cpu_frequency_mhz() -> float | None:
    """The current CPU clock when the OS exposes it (often not in containers)."""
    try:
        frequency = psutil.cpu_freq()
    except (OSError, NotImplementedError, FileNotFoundError):
        return None
    return round(frequency.current, 1) if frequency and frequency.current else None


def calibrate() -> dict[str, Any]:
    """fp32 matmul GFLOP/s, memory copy GB/s (medians, spread, raw timings), load average and CPU clock right now.

    The raw timings are kept so that a later run can put an interval on "how much faster was the machine"
    (common.runs compares two reports with them).
    """
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    matmul_samples = _timed(lambda: torch.mm(a, b))
    matmul_s, matmul_spread = _median_and_spread(matmul_samples)
    source = torch.ones(COPY_MIB * 2**20 // 4)
    target = torch.empty_like(source)
    copy_samples = _timed(lambda: target.copy_(source))
    copy_s, copy_spread = _median_and_spread(copy_samples)
    load1, load5, _ = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {
        "matmul_gflops": 2 * MATMUL_SIZE**3 / matmul_s / 1e9,
        "matmul_spread": matmul_spread,
        "matmul_samples_s": matmul_samples,
        "copy_gb_s": 2 * source.nbytes / copy_s / 1e9,  # read + write
        "copy_spread": copy_spread,
        "copy_samples_s": copy_samples,
        "load_avg_1m": load1,
        "load_avg_5m": load5,
        "cpu_mhz": cpu_frequency_mhz(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
