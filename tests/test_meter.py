"""PerformanceMeter and its statistics, checked against numpy and against workloads of known shape."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from common.meter import GenerationMeasurement, PerformanceMeter, Stats, measure_generation, median_ci95


def test_stats_match_numpy_on_known_samples():
    samples = [0.010, 0.012, 0.011, 0.050, 0.013, 0.009, 0.011, 0.012, 0.010, 0.014]
    stats = Stats.from_samples(samples)
    values = np.array(samples)
    assert stats.count == 10
    assert stats.mean == pytest.approx(values.mean())
    assert stats.median == pytest.approx(np.median(values))
    assert stats.p90 == pytest.approx(np.percentile(values, 90))
    assert stats.p95 == pytest.approx(np.percentile(values, 95))
    assert stats.p99 == pytest.approx(np.percentile(values, 99))
    assert stats.std == pytest.approx(values.std(ddof=1))
    assert stats.iqr == pytest.approx(np.percentile(values, 75) - np.percentile(values, 25))
    assert stats.cv == pytest.approx(values.std(ddof=1) / values.mean())
    assert (stats.min, stats.max) == (0.009, 0.050)


def test_median_ci_uses_order_statistics():
    values = np.arange(1.0, 101.0)  # n = 100: ranks 40 and 61 for a 95% interval
    low, high = median_ci95(values)
    assert (low, high) == (40.0, 61.0)
    assert low <= np.median(values) <= high
    assert median_ci95(np.array([1.0, 2.0, 3.0])) == (1.0, 3.0)


def test_stats_reject_empty_samples():
    with pytest.raises(ValueError):
        Stats.from_samples([])


def test_meter_times_a_known_sleep():
    meter = PerformanceMeter(warmup=1, min_runs=5, budget_s=0.0)
    result = meter.measure("sleep 10 ms", lambda: time.sleep(0.010), items=4, tokens=40)
    assert result.stats.count == 5
    assert result.stats.median >= 0.010  # sleep never returns early; a unit slip would fall below
    assert result.stats.median < 1.0
    assert result.items_per_s == pytest.approx(4 * 5 / sum(result.samples_s))
    assert result.tokens_per_s == pytest.approx(40 * 5 / sum(result.samples_s))


def test_meter_runs_warmup_then_exactly_the_requested_runs():
    calls = itertools.count()
    meter = PerformanceMeter(warmup=3, min_runs=7, max_runs=7, budget_s=10.0)
    result = meter.measure("count", lambda: next(calls))
    assert result.stats.count == 7
    assert next(calls) == 10  # 3 warm-up + 7 timed calls happened before this one


def test_meter_repeats_until_the_time_budget():
    meter = PerformanceMeter(warmup=0, min_runs=1, budget_s=0.05)
    result = meter.measure("sleep 5 ms", lambda: time.sleep(0.005))
    assert result.wall_s >= 0.05
    assert result.stats.count >= 2


def test_meter_flags_a_noisy_workload():
    durations = itertools.cycle([0.001, 0.006])
    meter = PerformanceMeter(warmup=0, min_runs=10, max_runs=10)
    result = meter.measure("jittery", lambda: time.sleep(next(durations)))
    assert result.noisy
    assert "noisy" in result.warnings[0]


def test_meter_reports_memory_peak_and_cpu_time():
    meter = PerformanceMeter(warmup=0, min_runs=3, max_runs=3)
    result = meter.measure("allocate", lambda: np.ones(50 * 2**20 // 8).sum())
    assert result.peak_rss_bytes > 0
    assert result.peak_cuda_allocated_bytes == 0  # CPU device: no CUDA counters
    assert result.cpu_util_pct > 0
    assert result.gpu_util_pct is None


def test_overhead_per_call_is_positive_and_small_against_a_sleep():
    overhead = PerformanceMeter().overhead_per_call_s(runs=500)
    assert 0 < overhead < 0.001


def test_generation_measurement_derives_per_token_latency():
    meter = PerformanceMeter(warmup=0, min_runs=3, max_runs=3)
    generation = measure_generation(meter, "fake", lambda n: time.sleep(0.002 + 0.001 * n), new_tokens=5, batch_size=2)
    assert isinstance(generation, GenerationMeasurement)
    first, full = generation.first_token.stats.median, generation.full.stats.median
    assert generation.time_to_first_token_s == first
    assert generation.per_token_s == pytest.approx((full - first) / 4)
    assert generation.tokens_per_s == pytest.approx(10 / full)
    assert generation.full.tokens_per_call == 10
