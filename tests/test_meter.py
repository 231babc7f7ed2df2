"""PerformanceMeter and its statistics, checked against numpy and against workloads of known duration.

The meter's logic (budgets, round-robin, ratios, verdicts) is tested on a simulated clock, where each workload
advances time by an exact amount: no assertion depends on how busy the machine is."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from common import meter as meter_module
from common.meter import GenerationMeasurement, PerformanceMeter, Stats, measure_generation, median_ci, median_ci_ranks


def test_stats_match_numpy_on_known_samples():
    samples = [0.010, 0.012, 0.011, 0.050, 0.013, 0.009, 0.011, 0.012, 0.010, 0.014]
    stats = Stats.from_samples(samples)
    values = np.array(samples)
    assert stats.count == 10
    assert stats.mean == pytest.approx(values.mean())
    assert stats.median == pytest.approx(np.median(values))
    assert stats.p90 == pytest.approx(np.percentile(values, 90))
    assert stats.p95 == pytest.approx(np.percentile(values, 95))
    assert stats.p99 is None  # 10 samples: a "p99" would only be the maximum
    assert stats.std == pytest.approx(values.std(ddof=1))
    assert stats.iqr == pytest.approx(np.percentile(values, 75) - np.percentile(values, 25))
    assert stats.cv == pytest.approx(values.std(ddof=1) / values.mean())
    assert (stats.min, stats.max) == (0.009, 0.050)


def test_median_ci_uses_exact_order_statistics():
    values = np.arange(1.0, 101.0)  # n = 100: ranks 40 and 61, exact binomial coverage 96.5%
    low, high, coverage = median_ci(values)
    assert (low, high) == (40.0, 61.0)
    assert coverage == pytest.approx(0.9648, abs=1e-4)
    assert median_ci_ranks(10)[:2] == (2, 9)  # the textbook table: 97.9% for n = 10
    assert median_ci_ranks(20)[:2] == (6, 15)


def test_median_ci_says_its_real_coverage_when_samples_are_few():
    low, high, coverage = median_ci(np.array([1.0, 2.0, 3.0]))
    assert (low, high) == (1.0, 3.0)
    assert coverage == pytest.approx(0.75)  # [min, max] of 3 samples misses the median one time in four
    assert "75% coverage" in Stats.from_samples([1.0, 2.0, 3.0]).ci_text()
    assert "coverage" not in Stats.from_samples(np.arange(1.0, 21.0)).ci_text()


def test_p99_needs_a_hundred_samples():
    values = np.linspace(0.0, 1.0, 100)
    assert Stats.from_samples(values).p99 == pytest.approx(np.percentile(values, 99))
    assert Stats.from_samples(values[:99]).p99 is None


def test_stats_reject_empty_samples():
    with pytest.raises(ValueError):
        Stats.from_samples([])


class SimulatedClock:
    """perf_counter for common.meter that only moves when a workload says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def workload(self, seconds: float):
        """A callable that 'takes' exactly this long."""
        def run() -> None:
            self.now += seconds
        return run


@pytest.fixture
def clock(monkeypatch) -> SimulatedClock:
    simulated = SimulatedClock()
    monkeypatch.setattr(meter_module, "time", SimpleNamespace(perf_counter=simulated))
    return simulated


def test_meter_times_a_known_duration(clock):
    meter = PerformanceMeter(warmup=1, min_runs=5, budget_s=0.0)
    result = meter.measure("10 ms", clock.workload(0.010), items=4, tokens=40)
    assert result.stats.count == 5
    assert result.stats.median == pytest.approx(0.010)
    assert result.items_per_s == pytest.approx(400)  # throughput from the median: 4 items per 10 ms
    assert result.tokens_per_s == pytest.approx(4000)


def test_meter_runs_warmup_then_exactly_the_requested_runs():
    calls = itertools.count()
    meter = PerformanceMeter(warmup=3, min_runs=7, max_runs=7, budget_s=10.0)
    result = meter.measure("count", lambda: next(calls))
    assert result.stats.count == 7
    assert next(calls) == 10  # 3 warm-up + 7 timed calls happened before this one


def test_meter_repeats_until_the_time_budget(clock):
    meter = PerformanceMeter(warmup=0, min_runs=1, budget_s=2.5)  # binary-exact times: no rounding at the edge
    result = meter.measure("0.25 s", clock.workload(0.25))
    assert result.stats.count == 10  # the budget is spent after exactly ten 0.25 s calls
    assert result.wall_s == 2.5


def test_meter_flags_a_noisy_workload(clock):
    durations = itertools.cycle([0.001, 0.006])
    meter = PerformanceMeter(warmup=0, min_runs=10, max_runs=10)
    result = meter.measure("jittery", lambda: clock.workload(next(durations))())
    assert result.noisy
    assert "noisy" in result.warnings[0]
    steady = meter.measure("steady", clock.workload(0.002))
    assert not steady.noisy and steady.warnings == []


def test_meter_reports_memory_peak_and_cpu_time():
    meter = PerformanceMeter(warmup=0, min_runs=3, max_runs=3)
    result = meter.measure("allocate", lambda: np.ones(50 * 2**20 // 8).sum())
    assert result.peak_rss_bytes > 0
    assert result.peak_cuda_allocated_bytes == 0  # CPU device: no CUDA counters
    assert result.cpu_util_pct > 0
    assert result.gpu_util_pct is None


def test_overhead_per_call_is_the_loop_time_of_an_empty_call():
    overhead = PerformanceMeter().overhead_per_call_s(runs=500)
    assert 0 < overhead


def test_generation_measurement_derives_per_token_latency(clock):
    meter = PerformanceMeter(warmup=1, min_runs=3, budget_s=0.0)
    generation = measure_generation(meter, "fake", lambda n: clock.workload(0.002 + 0.001 * n)(), new_tokens=5,
                                    batch_size=2)
    assert isinstance(generation, GenerationMeasurement)
    assert len(generation.first_token.samples_s) == len(generation.full.samples_s) == 3  # one each per round
    assert generation.time_to_first_token_s == pytest.approx(0.003)
    assert generation.per_token_s == pytest.approx(0.001)  # (7 ms - 3 ms) / 4 tokens after the first
    assert generation.tokens_per_s == pytest.approx(10 / 0.007)
    assert generation.full.tokens_per_call == 10


def test_decode_speedup_is_the_per_token_ratio_paired_by_round(clock):
    """Cache off: 5 ms per decoded token; cache on: 1 ms; both after the same 3 ms first token. End to end the
    ratio is (3 + 4 x 5) / (3 + 4 x 1) = 3.3x, per decoded token it is 5x."""
    meter = PerformanceMeter(warmup=1, min_runs=7, budget_s=0.0)
    comparison = meter.compare({"first": clock.workload(0.003), "on": clock.workload(0.007),
                                "off": clock.workload(0.023)})
    timed = comparison.measurements
    on, off = (GenerationMeasurement(name, 5, 1, timed["first"], timed[name]) for name in ("on", "off"))
    estimate, low, high = on.decode_speedup(off)
    assert estimate == pytest.approx(5.0) and low <= 5.0 <= high
    assert comparison.ratio("on", "off")[0] == pytest.approx(23 / 7)
    same = GenerationMeasurement("first", 5, 1, timed["first"], timed["first"])
    assert on.decode_speedup(same) is None  # no decode cost to divide by


def test_the_ratio_is_the_median_of_the_per_round_ratios(clock):
    """The exact interval is an interval of that median, so the estimate must be it: here the mean of the per-round
    ratios is 1.8x and the ratio of the two medians 3.0x, and either would sit beside an interval it does not
    belong to."""
    times = {"a": iter([0.001, 0.001, 0.001, 0.002, 0.002]), "b": iter([0.0015, 0.0015, 0.003, 0.003, 0.003])}
    meter = PerformanceMeter(warmup=0, min_runs=5, max_runs=5, budget_s=0.0)
    comparison = meter.compare({name: (lambda name=name: clock.workload(next(times[name]))()) for name in times},
                               min_rounds=5, max_rounds=5)
    per_round = [1.5, 1.5, 3.0, 1.5, 1.5]  # b over a, round by round
    estimate, low, high = comparison.ratio("a", "b")
    assert estimate == pytest.approx(float(np.median(per_round))) == pytest.approx(1.5)
    assert estimate != pytest.approx(float(np.mean(per_round)))
    assert (low, high) == pytest.approx(median_ci(np.sort(per_round))[:2])
    assert comparison.ratio_text("a", "b").startswith("1.50x [")


def test_compare_calls_two_identical_workloads_the_same(clock):
    meter = PerformanceMeter(warmup=1, min_runs=30, budget_s=0.0)
    comparison = meter.compare({"a": clock.workload(0.001), "b": clock.workload(0.001)})
    assert comparison.ratio("a", "b") == pytest.approx((1.0, 1.0, 1.0))
    assert comparison.verdict("a", "b") == "same" and comparison.verdict("b", "a") == "same"
    assert "no measurable difference" in comparison.sentence("a", "b")


def test_compare_calls_a_difference_inside_the_same_band_the_same(clock):
    meter = PerformanceMeter(warmup=1, min_runs=30, budget_s=0.0)
    comparison = meter.compare({"a": clock.workload(0.00100), "b": clock.workload(0.00102)})  # 2%: too small to act on
    assert comparison.ratio("a", "b")[1] > 1.0  # the interval excludes 1 ...
    assert comparison.verdict("a", "b") == "negligible"  # ... but stays within SAME_BAND
    assert "within +-3%: too small to matter" in comparison.sentence("a", "b")


def test_verdict_words_follow_the_interval():
    assert meter_module.verdict_of(1.05, 1.20) == "faster"
    assert meter_module.verdict_of(0.80, 0.95) == "slower"
    assert meter_module.verdict_of(0.99, 1.02) == "same"
    assert meter_module.verdict_of(1.01, 1.02) == "negligible"
    assert meter_module.verdict_of(1.02, 1.35) == "inconclusive"  # excludes 1, but reaches past the band
    assert meter_module.verdict_of(0.75, 1.06) == "inconclusive"


def test_compare_calls_a_wide_interval_inconclusive_and_says_how_many_rounds_would_settle_it(clock):
    meter = PerformanceMeter(warmup=1, min_runs=6, max_runs=6, budget_s=0.0)
    times = itertools.cycle([0.0010, 0.0008, 0.0010, 0.0014])  # a: 1 ms, b alternates 0.8 and 1.4 ms
    comparison = meter.compare({"a": clock.workload(0.001), "b": lambda: clock.workload(next(times))()},
                               min_rounds=6, max_rounds=6)
    estimate, low, high = comparison.ratio("a", "b")
    assert low < 1 / 1.03 and high > 1.03
    assert comparison.verdict("a", "b") == "inconclusive"
    needed = meter_module.rounds_to_settle(estimate, low, high, 6, (1 / 1.03, 1.03))
    assert "inconclusive" in comparison.sentence("a", "b")
    assert (f"about {needed:,} rounds would tell whether it is beyond +-3%" in comparison.sentence("a", "b")
            or "more than" in comparison.sentence("a", "b"))


def test_rounds_to_settle_shrinks_the_interval_as_one_over_sqrt_n():
    # 1.2x in [1.1, 1.5] after 10 rounds: half-width log(1.5/1.1)/2 must shrink below the margin log(1.2/1.03)
    half, margin = np.log(1.5 / 1.1) / 2, np.log(1.2 / 1.03)
    assert meter_module.rounds_to_settle(1.2, 1.1, 1.5, 10, (1.03,)) == max(11, int(np.ceil(10 * (half / margin) ** 2)))
    # 1.05x in [0.8, 1.4] after 5 rounds, bounds +-3%: the nearer bound (1.03) sets the margin
    half, margin = np.log(1.4 / 0.8) / 2, np.log(1.05 / 1.03)
    assert meter_module.rounds_to_settle(1.05, 0.8, 1.4, 5, (1 / 1.03, 1.03)) == int(np.ceil(5 * (half / margin) ** 2))
    assert meter_module.rounds_to_settle(1.03, 0.9, 1.2, 10, (1.03,)) is None  # on the bound: never settles
    assert "more than 10,000 rounds" in meter_module.settle_text(None)


def test_compare_prints_nothing_itself(clock, capsys):
    meter = PerformanceMeter(warmup=0, min_runs=3, budget_s=0.0)
    meter.compare({"a": clock.workload(0.001), "b": clock.workload(0.001)})
    assert capsys.readouterr().out == ""  # how to read a table is report.show's, printed once per lesson


def test_compare_finds_a_three_times_slower_workload(clock):
    meter = PerformanceMeter(warmup=1, min_runs=30, budget_s=0.0)
    calls = itertools.count()
    # every fifth round the machine is busy and both workloads take twice as long: pairing by round cancels it
    base = {"1 ms": 0.001, "3 ms": 0.003}
    comparison = meter.compare({name: (lambda name=name: clock.workload(
        base[name] * (2 if next(calls) // 2 % 5 == 0 else 1))()) for name in base})
    estimate, low, high = comparison.ratio("1 ms", "3 ms")
    assert (estimate, low, high) == pytest.approx((3.0, 3.0, 3.0))
    assert comparison.verdict("1 ms", "3 ms") == "faster"
    assert comparison.verdict("3 ms", "1 ms") == "slower"
    assert comparison.ratio_text("1 ms", "3 ms") == "3.00x [3.00-3.00, 30 rounds]"
    assert comparison.print_verdicts("3 ms") == [comparison.sentence("1 ms", "3 ms")]  # the baseline gets no line
    assert comparison.verdict_row("1 ms", "3 ms") == {
        "speedup": estimate, "speedup_low": low, "speedup_high": high, "rounds": 30, "verdict": "faster",
        "sentence": comparison.sentence("1 ms", "3 ms")}
    assert comparison.ratio("3 ms", "1 ms")[0] == pytest.approx(1 / 3)
    assert comparison.difference("3 ms", "1 ms") == pytest.approx((0.002, 0.002, 0.002))  # busy rounds: 4 ms, not 2


def test_compare_runs_round_robin_with_a_rotating_start():
    calls: list[str] = []
    meter = PerformanceMeter(warmup=2, min_runs=4, max_runs=4, budget_s=0.0)
    comparison = meter.compare({name: (lambda name=name: calls.append(name)) for name in "abc"}, min_rounds=4,
                               max_rounds=4)
    assert calls[:6] == list("aabbcc")  # warm-up: each workload twice, before any timing
    assert comparison.schedule == calls[6:] == list("abc" "bca" "cab" "abc")
    assert all(len(m.samples_s) == 4 for m in comparison.measurements.values())
    rows = comparison.rows(baseline="a")
    assert [row["verdict"] for row in rows][0] == "baseline"
    assert {"p50_ms", "iqr_ms", "runs", "items_per_s", "noisy", "speedup"} <= rows[1].keys()


MIB = 2**20


def test_each_workload_in_a_comparison_gets_its_own_cuda_peak_above_what_was_held(pretend_gpu):
    """On a pretend GPU holding 500 MiB of earlier models: the peaks are the calls' own working memory, per
    workload, not the absolute max_memory_allocated shared by every workload of the round-robin."""
    pretend_gpu.hold(500 * MIB)
    meter = PerformanceMeter("cuda:0", warmup=1, min_runs=3, max_runs=3, budget_s=0)
    comparison = meter.compare({"small": lambda: pretend_gpu.spike(10 * MIB),
                                "big": lambda: pretend_gpu.spike(100 * MIB)})
    peaks = {name: m.peak_cuda_allocated_bytes for name, m in comparison.measurements.items()}
    assert peaks == {"small": 10 * MIB, "big": 100 * MIB}
    assert pretend_gpu.resets == 6  # reset before every timed call, outside its timed window
    alone = meter.measure("small alone", lambda: pretend_gpu.spike(10 * MIB))
    assert alone.peak_cuda_allocated_bytes == 10 * MIB


def test_an_enclosing_cuda_peak_keeps_its_peak_across_the_meters_resets(pretend_gpu):
    from common.memory import CudaPeak

    meter = PerformanceMeter("cuda:0", warmup=0, min_runs=2, max_runs=2)
    with CudaPeak("cuda:0") as outer:
        pretend_gpu.spike(300 * MIB)
        meter.measure("small", lambda: pretend_gpu.spike(10 * MIB))
    assert outer.delta_bytes == 300 * MIB


class FakeNvml:
    """pynvml as far as the sampler uses it: samples stamped in microseconds, read once after the block."""

    NVML_GPU_UTILIZATION_SAMPLES = 1

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.calls = []  # (since_us, when the read happened)
        self.offsets: list[tuple[int, int]] = []  # (microseconds after the block's start, utilisation %)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetSamples(self, handle, kind, since_us):
        import time

        assert kind == self.NVML_GPU_UTILIZATION_SAMPLES
        self.calls.append((since_us, time.time() * 1e6))
        if not self.offsets:
            raise self.NVMLError("Not Found")
        return 1, [SimpleNamespace(timeStamp=since_us + offset, sampleValue=SimpleNamespace(uiVal=value))
                   for offset, value in self.offsets]


def test_gpu_utilisation_is_read_from_nvml_after_the_block_without_a_thread(pretend_gpu, monkeypatch):
    import sys
    import threading

    import torch

    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="abc"))
    threads = []
    meter = PerformanceMeter("cuda:0", warmup=0, min_runs=3, max_runs=3)
    result = meter.measure("idle", lambda: threads.append(threading.active_count()))
    assert result.gpu_util_pct is None  # NVML had no sample inside the block: not measurable, not 0%
    (since_us, read_us), = nvml.calls  # one read, after the block, of the samples since its start
    assert since_us < read_us and len(set(threads)) == 1

    nvml.offsets = [(-10, 99), (1, 40), (2, 60)]  # NVML's buffer may hold a sample older than the block
    assert meter.measure("busy", lambda: None).gpu_util_pct == 50.0
    sampler = meter_module._GpuUtilSampler(torch.device("cuda", 0))
    sampler.samples = [(100, 10), (200, 50), (300, 90), (400, 30)]
    assert sampler.mean_pct() == 45.0
    # a workload's share: only samples whose window (since the previous sample) lies inside one of its calls
    assert sampler.mean_pct([(100, 200), (290, 410)]) == 40.0
    assert sampler.mean_pct([(150, 250)]) is None


def test_a_cpu_row_never_shows_gpu_utilisation():
    from common import runs

    m = PerformanceMeter(warmup=0, min_runs=2, max_runs=2).measure("x", lambda: None)
    m.gpu_util_pct = 55.0  # what a round-robin with a GPU workload could attribute
    assert runs.result_row(m, device="cpu")["gpu_util_pct"] is None
    assert runs.result_row(m, device="cuda:0")["gpu_util_pct"] == 55.0


def test_ratio_is_per_item_so_a_bigger_batch_that_takes_longer_can_be_faster(clock):
    meter = PerformanceMeter(warmup=0, min_runs=5, budget_s=0.0)
    comparison = meter.compare({"batch 1": clock.workload(0.010), "batch 8": clock.workload(0.040)},
                               items={"batch 1": 1, "batch 8": 8})
    assert comparison.ratio("batch 8", "batch 1") == pytest.approx((2.0, 2.0, 2.0))  # 4x the time for 8x the texts
    assert comparison.verdict("batch 8", "batch 1") == "faster"
    rows = {row["workload"]: row for row in comparison.rows(baseline="batch 1")}
    assert rows["batch 8"]["items_per_s"] / rows["batch 1"]["items_per_s"] == pytest.approx(rows["batch 8"]["speedup"])
