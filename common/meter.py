"""PerformanceMeter: warm-up, synchronise, repeat to a budget, then robust statistics, throughput and peaks."""
from __future__ import annotations

import math
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import time_ns  # wall clock for NVML timestamps (tests simulate `time.perf_counter` alone)
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

from common.device import synchronize
from common.memory import CudaPeak, PeakRSSSampler, rss_bytes

NOISY_CV = 0.10  # a spread above 10% of the median makes a ratio of two medians unreliable
P99_MIN_SAMPLES = 100  # below this, "p99" is only the maximum


@dataclass(frozen=True)
class Stats:
    """Summary of latency samples in seconds: centre, spread, tail percentiles and a confidence interval of the median.

    p99 is None below P99_MIN_SAMPLES samples (it would only be the maximum); `ci_coverage` is the interval's real
    coverage, which falls below 95% when there are too few samples for an exact 95% interval.
    """

    count: int
    mean: float
    median: float
    p90: float
    p95: float
    p99: float | None
    std: float
    iqr: float
    cv: float
    min: float
    max: float
    ci95_low: float
    ci95_high: float
    ci_coverage: float

    @classmethod
    def from_samples(cls, samples: list[float] | np.ndarray) -> "Stats":
        """Compute every field from the samples themselves (numpy's linear percentiles)."""
        values = np.sort(np.asarray(samples, dtype=float))
        if values.size == 0:
            raise ValueError("no samples to summarise")
        p25, median, p75, p90, p95, p99 = np.percentile(values, [25, 50, 75, 90, 95, 99])
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        mean = float(values.mean())
        low, high, coverage = median_ci(values)
        return cls(
            count=int(values.size), mean=mean, median=float(median), p90=float(p90), p95=float(p95),
            p99=float(p99) if values.size >= P99_MIN_SAMPLES else None, std=std, iqr=float(p75 - p25),
            cv=std / mean if mean > 0 else 0.0, min=float(values[0]), max=float(values[-1]),
            ci95_low=low, ci95_high=high, ci_coverage=coverage,
        )

    def ci_text(self, scale: float = 1e3, unit: str = "ms") -> str:
        """The median's interval as text, with its real coverage when that is below 95%."""
        text = f"[{self.ci95_low * scale:.3g}, {self.ci95_high * scale:.3g}] {unit}"
        return text if self.ci_coverage >= 0.95 else f"{text} (only {self.ci_coverage:.0%} coverage at n={self.count})"


def median_ci_ranks(n: int, level: float = 0.95) -> tuple[int, int, float]:
    """1-based ranks (k, n+1-k) of the exact distribution-free interval of the median, and its real coverage.

    The number of samples below the true median is Binomial(n, 1/2); [x_(k), x_(n+1-k)] covers the median with
    probability 1 - 2 P(B <= k-1). The widest k whose coverage reaches `level` is taken; below n = 6 no k does, so
    the interval is [min, max] and its coverage (75% at n = 3) is returned for the reader to see.
    """
    if n < 1:
        raise ValueError("no samples")
    below = 0.0  # P(B <= k-1)
    best_k, best_coverage = 1, max(1 - 2 * 0.5**n, 0.0)
    for k in range(1, (n + 1) // 2 + 1):
        below += math.exp(math.lgamma(n + 1) - math.lgamma(k) - math.lgamma(n - k + 2) - n * math.log(2))
        coverage = 1 - 2 * below
        if coverage < level:
            break
        best_k, best_coverage = k, coverage
    return best_k, n + 1 - best_k, best_coverage


def median_ci(sorted_values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Exact distribution-free interval of the median from order statistics: (low, high, coverage)."""
    low_rank, high_rank, coverage = median_ci_ranks(int(sorted_values.size), level)
    return float(sorted_values[low_rank - 1]), float(sorted_values[high_rank - 1]), coverage


@dataclass
class Measurement:
    """One measured workload: its latency samples, statistics, throughput (from the median), peaks and utilisation."""

    name: str
    samples_s: list[float]
    stats: Stats
    items_per_call: int
    tokens_per_call: int
    items_per_s: float
    tokens_per_s: float
    peak_rss_bytes: int
    peak_rss_delta_bytes: int
    peak_cuda_allocated_bytes: int  # above what was allocated when its call started: the call's own working memory
    peak_cuda_reserved_bytes: int  # the allocator's whole reservation at its highest (what the GPU holds for us)
    cpu_util_pct: float
    gpu_util_pct: float | None
    noisy: bool
    wall_s: float
    warnings: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        """Median latency per call in milliseconds."""
        return self.stats.median * 1e3

    def row(self, **labels: Any) -> dict[str, Any]:
        """One table/CSV row with the house keys: labels, p50_ms and its interval, iqr_ms, runs, items_per_s (from the
        median), noisy."""
        row = {**labels, "p50_ms": self.stats.median * 1e3, "ci95_low_ms": self.stats.ci95_low * 1e3,
               "ci95_high_ms": self.stats.ci95_high * 1e3, "ci_coverage": self.stats.ci_coverage,
               "iqr_ms": self.stats.iqr * 1e3, "runs": self.stats.count, "items_per_s": self.items_per_s}
        if self.tokens_per_call:
            row["tokens_per_s"] = self.tokens_per_s
        row["noisy"] = self.noisy
        return row


def per_round_differences(a: Measurement, b: Measurement) -> np.ndarray:
    """t_a - t_b for each round-robin round (both timed in the same rounds), sorted for order statistics."""
    return np.sort(np.subtract(a.samples_s, b.samples_s))


@dataclass(frozen=True)
class LoadMeasurement:
    """Wall time and peak RSS of one model load (loads are not repeatable, so one sample)."""

    name: str
    seconds: float
    peak_rss_bytes: int
    peak_rss_delta_bytes: int
    rss_after_bytes: int


class _GpuUtilSampler:
    """NVML's utilisation samples of this GPU during a block, read once after it; None where NVML is absent.

    NVML samples on its own clock (every 1/6 s to 1 s, by GPU) and keeps a buffer, so nothing polls while the block
    is timed: nvmlDeviceGetSamples returns the samples taken since the block began. A sample is the share of its
    window (since the previous sample) in which at least one kernel ran, not how much of the GPU that kernel used.
    The device is found by UUID, because NVML numbers GPUs without CUDA_VISIBLE_DEVICES.
    """

    def __init__(self, device: torch.device) -> None:
        self.samples: list[tuple[int, int]] = []  # (NVML timestamp in microseconds since the epoch, utilisation %)
        self._handle = None
        self._since_us = 0
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(cuda_uuid(index))
                self._nvml = pynvml
            except Exception:  # NVML missing or driver too old: utilisation is simply not reported
                self._handle = None

    def __enter__(self) -> "_GpuUtilSampler":
        self._since_us = time_ns() // 1000
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is None:
            return
        try:
            _, samples = self._nvml.nvmlDeviceGetSamples(self._handle, self._nvml.NVML_GPU_UTILIZATION_SAMPLES,
                                                         self._since_us)
        except self._nvml.NVMLError:  # NOT_FOUND: the block was shorter than NVML's sample period
            samples = []
        self.samples = sorted((s.timeStamp, s.sampleValue.uiVal) for s in samples if s.timeStamp >= self._since_us)

    def mean_pct(self, spans: list[tuple[int, int]] | None = None) -> float | None:
        """Mean utilisation in the block, or over the samples whose whole window lies inside one of these spans
        (microseconds since the epoch); None when no sample qualifies."""
        if spans is None:
            values = [value for _, value in self.samples]
        else:
            values = [value for (begun, _), (ended, value) in zip(self.samples, self.samples[1:])
                      if any(start <= begun and ended <= stop for start, stop in spans)]
        return float(np.mean(values)) if values else None


def cuda_uuid(index: int) -> str:
    """NVML's name for the CUDA device at this (visible) index: "GPU-" plus torch's UUID."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


SAME_BAND = 0.03  # a speed difference under 3% is too small to act on
MAX_SETTLE_ROUNDS = 10_000  # beyond this, "rounds to settle" reads "more than"
VERDICT_WORDS = {"faster": "faster", "slower": "slower", "negligible": "within +-3%: too small to matter",
                 "same": "no measurable difference", "inconclusive": "inconclusive"}


def verdict_of(low: float, high: float) -> str:
    """The verdict code of a ratio interval: faster, slower, negligible, same or inconclusive (report.HOW_TO_READ)."""
    band_low, band_high = 1 / (1 + SAME_BAND), 1 + SAME_BAND
    if low > band_high:
        return "faster"
    if high < band_low:
        return "slower"
    if band_low <= low and high <= band_high:
        return "same" if low <= 1 <= high else "negligible"
    return "inconclusive"


def rounds_to_settle(estimate: float, low: float, high: float, rounds: int, bounds: tuple[float, ...]) -> int | None:
    """About how many rounds would put the interval wholly on one side of every bound (width shrinks as 1/sqrt(n)).

    None when the estimate sits on a bound (no number of rounds settles it) or the interval has no width.
    """
    half_width = (math.log(high) - math.log(low)) / 2
    margin = min(abs(math.log(estimate) - math.log(bound)) for bound in bounds)
    if margin <= 0 or half_width <= 0:
        return None
    return max(rounds + 1, math.ceil(rounds * (half_width / margin) ** 2))


def settle_text(needed: int | None, question: str = "whether it is beyond +-3%") -> str:
    """How many rounds would settle an undecided result, in words, naming the question they would answer."""
    if needed is None or needed > MAX_SETTLE_ROUNDS:
        return f"more than {MAX_SETTLE_ROUNDS:,} rounds would be needed to tell {question}"
    return f"about {needed:,} rounds would tell {question}"


@dataclass
class Comparison:
    """Workloads timed round-robin; speed ratios with an exact interval from the paired rounds, and verdicts.

    ratio(a, b) is the median of the per-round ratios of time per item, b's over a's, and its interval the
    distribution-free interval of that median (order statistics, as for Stats), so estimate and interval always
    agree. Pairing by round cancels
    what the machine did during that round; the interval's real coverage is kept beside it. Every figure about a
    pair (table, sentence, chart, bar) comes from ratio(); items/s comes from each workload's median.
    """

    measurements: dict[str, Measurement]
    schedule: list[str]  # the workloads in the order they ran, one entry per timed call

    @property
    def rounds(self) -> int:
        """Timed rounds (each workload ran once per round)."""
        return min(m.stats.count for m in self.measurements.values())

    def ratio(self, a: str, b: str) -> tuple[float, float, float]:
        """How many times faster a is than b per item: (median of the per-round (t_b / items_b) / (t_a / items_a),
        interval low, interval high). With equal items per call that is t_b / t_a; a batch of 8 that takes 4x as long
        as a batch of 1 is 2x as fast."""
        ma, mb = self.measurements[a], self.measurements[b]
        ta = np.asarray(ma.samples_s) / ma.items_per_call
        tb = np.asarray(mb.samples_s) / mb.items_per_call
        per_round = np.sort(tb / ta)
        low, high, _ = median_ci(per_round)
        return float(np.median(per_round)), low, high

    def difference(self, a: str, b: str) -> tuple[float, float, float]:
        """How many seconds longer a takes than b: (median of the per-round t_a - t_b, interval low, interval high)."""
        per_round = per_round_differences(self.measurements[a], self.measurements[b])
        low, high, _ = median_ci(per_round)
        return float(np.median(per_round)), low, high

    def coverage(self) -> float:
        """Real coverage of the ratio intervals at this number of rounds."""
        return median_ci_ranks(self.rounds)[2]

    def verdict(self, a: str, b: str) -> str:
        """a against b: faster, slower, negligible, same or inconclusive, from the ratio's interval (verdict_of)."""
        _, low, high = self.ratio(a, b)
        return verdict_of(low, high)

    def sentence(self, a: str, b: str) -> str:
        """The verdict in words with its numbers; an inconclusive one says about how many rounds would settle it."""
        estimate, low, high = self.ratio(a, b)
        interval = f"{low:.2f}-{high:.2f}, {self.rounds} rounds"
        if self.coverage() < 0.95:
            interval += f", {self.coverage():.0%} interval"
        verdict = self.verdict(a, b)
        if verdict in ("faster", "slower"):
            return f"{a} is {estimate:.2f}x as fast as {b}: {verdict} (interval {interval})"
        if verdict == "inconclusive":
            bounds = (1 / (1 + SAME_BAND), 1 + SAME_BAND)
            interval += "; " + settle_text(rounds_to_settle(estimate, low, high, self.rounds, bounds))
        return f"{a} vs {b}: {VERDICT_WORDS[verdict]} ({estimate:.2f}x, interval {interval})"

    def ratio_text(self, a: str, b: str) -> str:
        """The ratio a over b with its interval and round count, as bars quote it."""
        estimate, low, high = self.ratio(a, b)
        return f"{estimate:.2f}x [{low:.2f}-{high:.2f}, {self.rounds} rounds]"

    def verdict_row(self, a: str, b: str) -> dict[str, Any]:
        """a against b as table keys: speedup with its interval, rounds, verdict and the sentence."""
        speedup, low, high = self.ratio(a, b)
        return {"speedup": speedup, "speedup_low": low, "speedup_high": high, "rounds": self.rounds,
                "verdict": self.verdict(a, b), "sentence": self.sentence(a, b)}

    def print_verdicts(self, baseline: str) -> list[str]:
        """Print every other workload's verdict against the baseline, one indented line each; return the lines."""
        lines = [self.sentence(name, baseline) for name in self.measurements if name != baseline]
        for line in lines:
            print(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))
        return lines

    def rows(self, baseline: str | None = None, **labels: Any) -> list[dict[str, Any]]:
        """One row per workload; with a baseline, also its speed-up over it, interval and verdict."""
        rows = []
        for name, measurement in self.measurements.items():
            row = measurement.row(**labels, workload=name)
            if baseline is not None:
                estimate, low, high = self.ratio(name, baseline)
                row.update(speedup=estimate, speedup_low=low, speedup_high=high,
                           verdict="baseline" if name == baseline else self.verdict(name, baseline))
            rows.append(row)
        return rows


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

    @classmethod
    def for_run(cls, quick: bool, device: torch.device | str = "cpu", **overrides: Any) -> "PerformanceMeter":
        """The lessons' meter: 5 runs and 1 s per measurement, or 3 runs and 0.2 s with --quick."""
        settings = dict(warmup=2, min_runs=3, budget_s=0.2) if quick else dict(warmup=2, min_runs=5, budget_s=1.0)
        return cls(device, **{**settings, **overrides})

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
        clock = time.perf_counter
        for _ in range(warmup):
            fn()
        synchronize(self.device)
        samples: list[float] = []
        with _Resources(self.device) as resources:
            started = clock()
            while True:
                with resources.call(name):
                    samples.append(self._time_once(fn))
                if len(samples) >= max_runs or (len(samples) >= min_runs and clock() - started >= budget_s):
                    break
        return resources.measurement(name, samples, items, tokens)

    def compare(
        self,
        workloads: dict[str, Callable[[], Any]],
        items: int | dict[str, int] = 1,
        tokens: int | dict[str, int] = 0,
        *,
        warmup: int | None = None,
        min_rounds: int | None = None,
        max_rounds: int = 1000,
        budget_s: float | None = None,
        progress: str | None = None,
    ) -> Comparison:
        """Warm each workload up, then time them in round-robin rounds (starting point rotating) until the budget.

        Round-robin puts every workload under the same machine state, so a busy neighbour slows all of them alike
        and the paired per-round ratios stay honest where back-to-back measurements would drift apart.
        """
        names = list(workloads)
        warmup = self.warmup if warmup is None else warmup
        min_rounds = self.min_runs if min_rounds is None else min_rounds
        budget_s = self.budget_s * len(names) if budget_s is None else budget_s
        per_items = items if isinstance(items, dict) else dict.fromkeys(names, items)
        per_tokens = tokens if isinstance(tokens, dict) else dict.fromkeys(names, tokens)
        for name in names:
            for _ in range(warmup):
                workloads[name]()
        synchronize(self.device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        schedule: list[str] = []
        bar = tqdm(total=min_rounds, desc=progress, disable=True if progress is None else None, leave=False,
                   unit="round")
        with bar, _Resources(self.device) as resources:
            started = time.perf_counter()
            for round_index in range(max_rounds):
                for offset in range(len(names)):
                    name = names[(round_index + offset) % len(names)]
                    with resources.call(name):
                        samples[name].append(self._time_once(workloads[name]))
                    schedule.append(name)
                bar.update(1)
                if round_index + 1 >= min_rounds and time.perf_counter() - started >= budget_s:
                    break
        return Comparison(
            {name: resources.measurement(name, samples[name], per_items[name], per_tokens[name]) for name in names},
            schedule,
        )

    def _time_once(self, fn: Callable[[], Any]) -> float:
        """Seconds one call of fn takes, GPU work included (synchronised on CUDA and MPS)."""
        started = time.perf_counter()
        fn()
        if self.device.type in ("cuda", "mps"):
            synchronize(self.device)
        return time.perf_counter() - started

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


class _Resources:
    """What a timed block used besides time: peak RSS, CPU utilisation, and per workload its CUDA peaks (of this
    device, above each call's start) and GPU utilisation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss = PeakRSSSampler()
        self._gpu = _GpuUtilSampler(device)
        self._cuda_allocated: dict[str, int] = {}
        self._cuda_reserved: dict[str, int] = {}
        self._spans: dict[str, list[tuple[int, int]]] = {}  # each workload's calls, microseconds since the epoch

    def __enter__(self) -> "_Resources":
        self._cpu_before = psutil.Process().cpu_times()
        self._rss.__enter__()
        self._gpu.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._started
        self._gpu.__exit__(*exc)
        self._rss.__exit__(*exc)
        cpu_after = psutil.Process().cpu_times()
        cpu_seconds = (cpu_after.user - self._cpu_before.user) + (cpu_after.system - self._cpu_before.system)
        self.cpu_util_pct = 100.0 * cpu_seconds / self.wall_s if self.wall_s > 0 else 0.0

    @contextmanager
    def call(self, name: str) -> Iterator[None]:
        """Around one timed call of workload `name`: its CUDA peak above the call's start, and its time span.

        The peak counters are reset before each call (outside the timed window), so in a round-robin each workload
        gets its own peak, and memory already held (earlier models, other workloads' outputs) is not counted.
        """
        with CudaPeak(self.device) as cuda:
            started = time_ns() // 1000
            yield
        self._spans.setdefault(name, []).append((started, time_ns() // 1000))
        self._cuda_allocated[name] = max(self._cuda_allocated.get(name, 0), cuda.delta_bytes)
        self._cuda_reserved[name] = max(self._cuda_reserved.get(name, 0), cuda.reserved_bytes)

    def measurement(self, name: str, samples: list[float], items: int, tokens: int) -> Measurement:
        """A Measurement of these samples; throughput is work per call over the median call."""
        stats = Stats.from_samples(samples)
        noisy = stats.count > 2 and stats.median > 0 and stats.iqr / stats.median > NOISY_CV
        warnings = [f"{name}: noisy machine (IQR is {stats.iqr / stats.median:.0%} of the median over "
                    f"{stats.count} runs); compare ratios from this run only"] if noisy else []
        return Measurement(
            name=name, samples_s=samples, stats=stats, items_per_call=items, tokens_per_call=tokens,
            items_per_s=items / stats.median if stats.median > 0 else 0.0,
            tokens_per_s=tokens / stats.median if stats.median > 0 else 0.0,
            peak_rss_bytes=self._rss.peak_bytes, peak_rss_delta_bytes=self._rss.peak_delta_bytes,
            peak_cuda_allocated_bytes=self._cuda_allocated.get(name, 0),
            peak_cuda_reserved_bytes=self._cuda_reserved.get(name, 0), cpu_util_pct=self.cpu_util_pct,
            # one workload owns the whole block; in a round-robin only samples inside its own calls are its
            gpu_util_pct=self._gpu.mean_pct(None if len(self._spans) == 1 else self._spans.get(name, [])),
            noisy=noisy, wall_s=self.wall_s,
            warnings=warnings,
        )


@dataclass
class GenerationMeasurement:
    """Generation speed from two workloads timed round-robin: 1 new token (time to first token) and N new tokens."""

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
        """Median over rounds of each token's cost after the first: (t(N) - t(1)) / (N - 1) within one round."""
        per_round = per_round_differences(self.full, self.first_token)
        return float(np.median(per_round)) / max(self.new_tokens - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole call (batch included), from the median."""
        return self.full.tokens_per_s

    def decode_speedup(self, other: "GenerationMeasurement") -> tuple[float, float, float] | None:
        """How many times cheaper a decoded token is here than in `other`, timed in the same rounds against the same
        first-token workload: median and interval of the per-round (t_other(N) - t(1)) / (t(N) - t(1)).

        None when a round's decode cost is not positive (N too small to see above the noise)."""
        mine = np.subtract(self.full.samples_s, self.first_token.samples_s)
        theirs = np.subtract(other.full.samples_s, other.first_token.samples_s)
        if (mine <= 0).any() or (theirs <= 0).any():
            return None
        per_round = np.sort(theirs / mine)
        low, high, _ = median_ci(per_round)
        return float(np.median(per_round)), low, high


def measure_generation(
    meter: PerformanceMeter, name: str, generate: Callable[[int], Any], new_tokens: int, batch_size: int = 1,
) -> GenerationMeasurement:
    """Time `generate(n)`, which must produce exactly n new tokens per sequence, for n = 1 and n = new_tokens.

    The two are timed round-robin, so each round's difference is the decode cost under one machine state.
    """
    first, full = f"{name} (1 token)", f"{name} ({new_tokens} tokens)"
    comparison = meter.compare({first: lambda: generate(1), full: lambda: generate(new_tokens)}, items=batch_size,
                               tokens={first: batch_size, full: new_tokens * batch_size})
    return GenerationMeasurement(name, new_tokens, batch_size, comparison.measurements[first],
                                 comparison.measurements[full])
