"""The matmul reference as a limit: best-of on a fake clock, and the theoretical peak's arithmetic."""
from __future__ import annotations

import itertools

import pytest

from common import calibration


def fake_clock(durations: list[float]):
    """A clock whose successive (start, end) readings are `durations` apart, one pair per timed call."""
    readings = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
    return lambda: next(readings)


def test_matmul_peak_is_the_fastest_call_over_every_size_and_repeat():
    # sizes 8 then 16, three repeats each: 16x16 in 0.001 s (8.19 MFLOP/s) beats any 8x8 call (at best 1.02 MFLOP/s)
    durations = [0.002, 0.001, 0.003, 0.004, 0.001, 0.002]
    peak = calibration.matmul_peak((8, 16), 3, clock=fake_clock(durations))
    assert peak["flops"] == pytest.approx(2 * 16**3 / 0.001)  # the maximum, not the median (2 * 16^3 / 0.002)
    assert (peak["size"], peak["calls"]) == (16, 6)
    slowest_first = calibration.matmul_peak((8,), 3, clock=fake_clock([0.5, 0.25, 1.0]))
    assert slowest_first["flops"] == pytest.approx(2 * 8**3 / 0.25)


def test_on_a_gpu_the_matmul_peak_comes_from_cuda_events_not_the_host_clock(monkeypatch):
    """A host clock around one small GPU matmul counts launch and sync as compute."""
    import torch

    asked = []
    monkeypatch.setattr(calibration, "cuda_matmul_flops", lambda device, calls: asked.append((device, calls)) or 5e13)

    def host_clock():
        pytest.fail("the host clock timed a GPU matmul")

    peak = calibration.matmul_peak((256, 512), 3, torch.device("cuda", 1), clock=host_clock)
    assert peak["flops"] == 5e13 and asked == [(torch.device("cuda", 1), 50)]


class ColdStart:
    """perf_counter for common.calibration that moves only when the workload runs: each call takes `cold_s` until
    `cold_until` seconds have passed, then `warm_s`."""

    def __init__(self, cold_s: float, warm_s: float, cold_until: float) -> None:
        self.now, self.calls = 0.0, 0
        self.cold_s, self.warm_s, self.cold_until = cold_s, warm_s, cold_until

    def __call__(self) -> float:
        return self.now

    def workload(self) -> None:
        self.calls += 1
        self.now += self.cold_s if self.now < self.cold_until - 1e-9 else self.warm_s


def test_the_calibration_is_warm_before_its_first_reading(monkeypatch):
    """A fresh process runs cold for a while (a clock ramping up, pages and threads still to come): here every call
    takes 20 ms for the first 0.1 s, then 10 ms. One warm-up call left four cold calls of seven in the timings, and
    their median read half the machine's speed, as a first reading of 104.5 GFLOP/s against 150 did (issue 27)."""
    from types import SimpleNamespace

    cold = ColdStart(cold_s=0.020, warm_s=0.010, cold_until=0.1)
    monkeypatch.setattr(calibration, "time", SimpleNamespace(perf_counter=cold))
    assert calibration._timed(cold.workload) == pytest.approx([0.010] * calibration.ROUNDS)
    assert cold.calls == 5 + calibration.ROUNDS  # warmed for the whole cold spell: five calls of 20 ms

    slow = ColdStart(cold_s=0.5, warm_s=0.5, cold_until=0.0)
    monkeypatch.setattr(calibration, "time", SimpleNamespace(perf_counter=slow))
    calibration._timed(slow.workload, rounds=3)
    assert slow.calls == calibration.WARMUP_CALLS + 3  # a call slower than the warm-up time still gets its calls
