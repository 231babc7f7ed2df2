"""PerformanceMeter: warm-up, synchronise, repeat to a budget, then robust statistics, throughput and peaks."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import psutil
import torch

from common.device import synchronize
from common.memory import PeakRSSSampler, rss_bytes

NOISY_CV = 0.10  # a spread above 10% of the median makes a ratio of two medians unreliable


@dataclass(frozen=True)
class Stats:
    """Summary of latency samples in seconds: centre, spread, tail percentiles and a 95% CI of the median."""

    count: int
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    std: float
    iqr: float
    cv: float
    min: float
    max: float
    ci95_low: float
    ci95_high: float

    @classmethod
    def from_samples(cls, samples: list[float] | np.ndarray) -> "Stats":
        """Compute every field from the samples themselves (numpy's linear percentiles)."""
        values = np.sort(np.asarray(samples, dtype=float))
        if values.size == 0:
            raise ValueError("no samples to summarise")
        p25, median, p75, p90, p95, p99 = np.percentile(values, [25, 50, 75, 90, 95, 99])
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        mean = float(values.mean())
        low, high = median_ci95(values)
        return cls(
            count=int(values.size), mean=mean, median=float(median), p90=float(p90), p95=float(p95),
            p99=float(p99), std=std, iqr=float(p75 - p25), cv=std / mean if mean > 0 else 0.0,
            min=float(values[0]), max=float(values[-1]), ci95_low=low, ci95_high=high,
        )


def median_ci95(sorted_values: np.ndarray) -> tuple[float, float]:
    """Distribution-free 95% confidence interval of the median from order statistics (binomial, normal approx.)."""
    n = sorted_values.size
    half_width = 1.96 * math.sqrt(n) / 2
    lower_rank = max(int(math.floor(n / 2 - half_width)), 1)
    upper_rank = min(int(math.ceil(n / 2 + half_width)) + 1, n)
    return float(sorted_values[lower_rank - 1]), float(sorted_values[upper_rank - 1])


@dataclass
class Measurement:
    """One measured workload: its latency samples, statistics, throughput, peaks and utilisation."""

    name: str
    samples_s: list[float]
    stats: Stats
    items_per_call: int
    tokens_per_call: int
    items_per_s: float
    tokens_per_s: float
    peak_rss_bytes: int
    peak_rss_delta_bytes: int
    peak_cuda_allocated_bytes: int
    peak_cuda_reserved_bytes: int
    cpu_util_pct: float
    gpu_util_pct: float | None
    noisy: bool
    wall_s: float
    warnings: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        """Median latency per call in milliseconds."""
        return self.stats.median * 1e3

    def summary(self) -> dict[str, Any]:
        """Flat, table-ready numbers (ms, MiB, per-second) without the raw samples."""
        return {
            "name": self.name,
            "runs": self.stats.count,
            "p50_ms": self.stats.median * 1e3,
            "p90_ms": self.stats.p90 * 1e3,
            "p99_ms": self.stats.p99 * 1e3,
            "iqr_ms": self.stats.iqr * 1e3,
            "cv": self.stats.cv,
            "items_per_s": self.items_per_s,
            "tokens_per_s": self.tokens_per_s,
            "peak_rss_mib": self.peak_rss_bytes / 2**20,
            "peak_cuda_alloc_mib": self.peak_cuda_allocated_bytes / 2**20,
            "cpu_util_pct": self.cpu_util_pct,
            "gpu_util_pct": self.gpu_util_pct,
            "noisy": self.noisy,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, raw samples included, for report.json."""
        data = asdict(self)
        data["median_ms"] = self.median_ms
        return data


@dataclass(frozen=True)
class LoadMeasurement:
    """Wall time and peak RSS of one model load (loads are not repeatable, so one sample)."""

    name: str
    seconds: float
    peak_rss_bytes: int
    peak_rss_delta_bytes: int
    rss_after_bytes: int


class _GpuUtilSampler:
    """Polls NVML's utilisation counter on a thread; mean of the samples, or None where NVML is absent."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.samples: list[int] = []
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval_s = interval_s
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nvml = pynvml
            except Exception:  # NVML missing or driver too old: utilisation is simply not reported
                self._handle = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_GpuUtilSampler":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._poll, name="gpu-util", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean_pct(self) -> float | None:
        """Mean utilisation seen during the block, None when not measurable."""
        return float(np.mean(self.samples)) if self.samples else None


class PerformanceMeter:
    """Times a callable like torch.utils.benchmark: warm-up, synchronise, repeat until a count and time budget."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        warmup: int = 2,
        min_runs: int = 5,
        max_runs: int = 10_000,
        budget_s: float = 1.0,
    ) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.min_runs = min_runs
        self.max_runs = max_runs
        self.budget_s = budget_s

    def measure(
        self,
        name: str,
        fn: Callable[[], Any],
        items: int = 1,
        tokens: int = 0,
        *,
        warmup: int | None = None,
        min_runs: int | None = None,
        max_runs: int | None = None,
        budget_s: float | None = None,
    ) -> Measurement:
        """Run fn repeatedly; `items` and `tokens` are the real (non-padding) work one call does."""
        warmup = self.warmup if warmup is None else warmup
        min_runs = self.min_runs if min_runs is None else min_runs
        max_runs = self.max_runs if max_runs is None else max_runs
        budget_s = self.budget_s if budget_s is None else budget_s
        device, clock = self.device, time.perf_counter
        sync_needed = device.type in ("cuda", "mps")

        for _ in range(warmup):
            fn()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        samples: list[float] = []
        cpu_before = psutil.Process().cpu_times()
        with PeakRSSSampler() as rss, _GpuUtilSampler(device) as gpu:
            started = clock()
            while True:
                t0 = clock()
                fn()
                if sync_needed:
                    synchronize(device)
                samples.append(clock() - t0)
                if len(samples) >= max_runs or (len(samples) >= min_runs and clock() - started >= budget_s):
                    break
            wall = clock() - started
        cpu_after = psutil.Process().cpu_times()

        stats = Stats.from_samples(samples)
        total = float(np.sum(samples))
        cpu_seconds = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        noisy = stats.count > 2 and stats.median > 0 and stats.iqr / stats.median > NOISY_CV
        warnings = []
        if noisy:
            warnings.append(
                f"{name}: noisy machine (IQR is {stats.iqr / stats.median:.0%} of the median over "
                f"{stats.count} runs); compare ratios from this run only"
            )
        return Measurement(
            name=name,
            samples_s=samples,
            stats=stats,
            items_per_call=items,
            tokens_per_call=tokens,
            items_per_s=items * stats.count / total if total > 0 else 0.0,
            tokens_per_s=tokens * stats.count / total if total > 0 else 0.0,
            peak_rss_bytes=rss.peak_bytes,
            peak_rss_delta_bytes=rss.peak_delta_bytes,
            peak_cuda_allocated_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
            peak_cuda_reserved_bytes=torch.cuda.max_memory_reserved() if device.type == "cuda" else 0,
            cpu_util_pct=100.0 * cpu_seconds / wall if wall > 0 else 0.0,
            gpu_util_pct=gpu.mean_pct,
            noisy=noisy,
            wall_s=wall,
            warnings=warnings,
        )

    def time_load(self, name: str, load: Callable[[], Any]) -> tuple[Any, LoadMeasurement]:
        """Call a loader once, returning its result with wall time and peak RSS during the load."""
        with PeakRSSSampler() as rss:
            started = time.perf_counter()
            result = load()
            synchronize(self.device)
            seconds = time.perf_counter() - started
        return result, LoadMeasurement(name, seconds, rss.peak_bytes, rss.peak_delta_bytes, rss_bytes())

    def overhead_per_call_s(self, runs: int = 2000) -> float:
        """The meter's own cost per timed call: loop wall time per call of an empty function."""
        empty = self.measure("empty", lambda: None, warmup=10, min_runs=runs, max_runs=runs, budget_s=0)
        return empty.wall_s / empty.stats.count


@dataclass
class GenerationMeasurement:
    """Generation speed from two measured workloads: 1 new token (time to first token) and N new tokens."""

    name: str
    new_tokens: int
    batch_size: int
    first_token: Measurement
    full: Measurement

    @property
    def time_to_first_token_s(self) -> float:
        """Median latency of prefill plus one decoded token."""
        return self.first_token.stats.median

    @property
    def per_token_s(self) -> float:
        """Median cost of each token after the first: (t(N) - t(1)) / (N - 1)."""
        return (self.full.stats.median - self.first_token.stats.median) / max(self.new_tokens - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole call (batch included), from the median."""
        return self.new_tokens * self.batch_size / self.full.stats.median

    def summary(self) -> dict[str, Any]:
        """Table-ready numbers."""
        return {
            "name": self.name,
            "new_tokens": self.new_tokens,
            "batch": self.batch_size,
            "ttft_ms": self.time_to_first_token_s * 1e3,
            "per_token_ms": self.per_token_s * 1e3,
            "tokens_per_s": self.tokens_per_s,
            "p50_total_ms": self.full.stats.median * 1e3,
            "noisy": self.first_token.noisy or self.full.noisy,
        }


def measure_generation(
    meter: PerformanceMeter, name: str, generate: Callable[[int], Any], new_tokens: int, batch_size: int = 1,
    **measure_kwargs: Any,
) -> GenerationMeasurement:
    """Time `generate(n)`, which must produce exactly n new tokens per sequence, for n = 1 and n = new_tokens."""
    first = meter.measure(f"{name} (1 token)", lambda: generate(1), items=batch_size, tokens=batch_size,
                          **measure_kwargs)
    full = meter.measure(f"{name} ({new_tokens} tokens)", lambda: generate(new_tokens), items=batch_size,
                         tokens=new_tokens * batch_size, **measure_kwargs)
    return GenerationMeasurement(name, new_tokens, batch_size, first, full)
