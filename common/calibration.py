"""A fixed, short machine benchmark taken at the start and end of every run, so runs can be compared fairly."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import psutil
import torch

from common.device import cuda_matmul_flops

MATMUL_SIZE = 512      # 0.27 GFLOP a call: compute-bound, a few ms on one core
COPY_MIB = 64          # larger than any last-level cache: memory-bound
ROUNDS = 7             # median of 7 short timings: each figure takes well under 0.3 s
WARMUP_CALLS = 2       # as the meter warms every workload
WARMUP_S = 0.1         # and at least this long: a cold start is a matter of time (clock ramp), not of calls


def _timed(fn: Any, rounds: int = ROUNDS, warmup_s: float = WARMUP_S) -> list[float]:
    """Seconds of `rounds` timed calls, in the order they ran, after a warm-up of WARMUP_CALLS calls and warmup_s.

    A fresh process's first calls run cold (thread pool start-up, page faults, a clock still ramping up): a first
    reading taken without warming read 104.5 GFLOP/s where the same run's later ones read about 150."""
    clock = time.perf_counter
    began = clock()
    calls = 0
    while calls < WARMUP_CALLS or clock() - began < warmup_s:
        fn()
        calls += 1
    times = []
    for _ in range(rounds):
        started = clock()
        fn()
        times.append(clock() - started)
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


def matmul_peak(sizes: tuple[int, ...], repeats: int, device: torch.device | str = "cpu",
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Best-of fp32 matmul FLOP/s: every size `repeats` times after a warm-up, the fastest call of all.

    A reference must be a limit, so one median on a busy machine will not do: the maximum over sizes and repeats
    is the closest this run came to what the hardware can do.
    """
    if torch.device(device).type == "cuda":  # a host clock would count launch and sync: CUDA events, queued calls
        return {"flops": cuda_matmul_flops(torch.device(device), calls=50), "size": 4096, "calls": 3 * 50}
    best: dict[str, Any] = {"flops": 0.0, "size": None, "calls": 0}
    for size in sizes:
        a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
        torch.mm(a, b)  # warm-up: first-call allocation and thread start-up are not the hardware's limit
        for _ in range(repeats):
            started = clock()
            torch.mm(a, b)
            flops = 2 * size**3 / max(clock() - started, 1e-12)
            best["calls"] += 1
            if flops > best["flops"]:
                best.update(flops=flops, size=size)
    return best


def calibrate(device: torch.device | str = "cpu") -> dict[str, Any]:
    """fp32 matmul GFLOP/s, memory copy GB/s (medians, spread, raw timings), load average and CPU clock right now,
    and on a CUDA run the GPU's fp32 matmul GFLOP/s too (CUDA events: a slower or different GPU shows there).

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
    device = torch.device(device)
    gpu_gflops = cuda_matmul_flops(device, calls=10) / 1e9 if device.type == "cuda" else None
    load1, load5, _ = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {
        "matmul_gflops": 2 * MATMUL_SIZE**3 / matmul_s / 1e9,
        "matmul_spread": matmul_spread,
        "matmul_samples_s": matmul_samples,
        "copy_gb_s": 2 * source.nbytes / copy_s / 1e9,  # read + write
        "copy_spread": copy_spread,
        "copy_samples_s": copy_samples,
        "gpu_matmul_gflops": gpu_gflops,
        "load_avg_1m": load1,
        "load_avg_5m": load5,
        "cpu_mhz": cpu_frequency_mhz(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
