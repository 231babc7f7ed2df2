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


def _median_seconds(fn: Any, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median and relative spread (IQR over median) of `rounds` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    spread = (times[(3 * len(times)) // 4] - times[len(times) // 4]) / median if median > 0 else 0.0
    return median, spread


def cpu_frequency_mhz() -> float | None:
    """The current CPU clock when the OS exposes it (often not in containers)."""
    try:
        frequency = psutil.cpu_freq()
    except (OSError, NotImplementedError, FileNotFoundError):
        return None
    return round(frequency.current, 1) if frequency and frequency.current else None


def calibrate() -> dict[str, Any]:
    """fp32 matmul GFLOP/s, memory copy GB/s (medians, with their spread), load average and CPU clock right now."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    matmul_s, matmul_spread = _median_seconds(lambda: torch.mm(a, b))
    source = torch.ones(COPY_MIB * 2**20 // 4)
    target = torch.empty_like(source)
    copy_s, copy_spread = _median_seconds(lambda: target.copy_(source))
    load1, load5, _ = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {
        "matmul_gflops": 2 * MATMUL_SIZE**3 / matmul_s / 1e9,
        "matmul_spread": matmul_spread,
        "copy_gb_s": 2 * source.nbytes / copy_s / 1e9,  # read + write
        "copy_spread": copy_spread,
        "load_avg_1m": load1,
        "load_avg_5m": load5,
        "cpu_mhz": cpu_frequency_mhz(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
