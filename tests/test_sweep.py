"""common.sweep: which batch sizes fit (memory stop rule) and the knee of a throughput curve."""
from __future__ import annotations

import numpy as np
import torch

from common.meter import verdict_of
from common.sweep import find_knee, fitting_batches

BATCHES = [1, 2, 4, 8, 16, 32, 64]


def intervals(throughput: list[float], width: float = 0.02):
    """gain(larger, smaller) of a synthetic curve: the throughput ratio with an interval +-width around it."""
    at = dict(zip(BATCHES, throughput))
    return lambda larger, smaller: (at[larger] / at[smaller], at[larger] / at[smaller] / (1 + width),
                                    at[larger] / at[smaller] * (1 + width))


def test_find_knee_on_synthetic_curves():
    assert find_knee(BATCHES, intervals([1, 2, 4, 8, 8, 8, 8])) == 8  # linear scaling, then flat
    assert find_knee(BATCHES, intervals([10, 19, 24, 24.5, 24.6, 24.7, 24.8])) == 4  # +3% at most: not "faster"
    assert find_knee(BATCHES, intervals([10, 19, 24, 25, 25.5, 25.6, 25.7])) == 8  # batch 64 is 7% above batch 4
    assert find_knee(BATCHES, intervals([1, 2, 4, 8, 9, 6, 3])) == 16  # a peak: nothing beyond it beats it
    assert find_knee(BATCHES, intervals(BATCHES)) is None  # still doubling: no knee yet
    assert find_knee(BATCHES, intervals([5] * 7)) == 1  # flat: batching buys nothing
    assert find_knee(BATCHES, intervals([9, 8, 7, 6, 5, 4, 3])) == 1  # falling: batching only costs
    # a wide interval keeps a 10% rise from counting, so the knee moves down to where gains were decided
    assert find_knee(BATCHES, intervals([10, 19, 24, 26.4, 26.4, 26.4, 26.4])) == 8
    assert find_knee(BATCHES, intervals([10, 19, 24, 26.4, 26.4, 26.4, 26.4], width=0.2)) == 4


def test_the_knee_never_contradicts_the_best_measured():
    """Whatever the curve, no larger batch than the knee is decidedly faster than it (common.meter.verdict_of)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        curve = list(np.cumsum(rng.uniform(-1, 3, len(BATCHES))) + 20)
        gain = intervals(curve, width=float(rng.uniform(0.01, 0.3)))
        knee = find_knee(BATCHES, gain)
        if knee is not None:
            assert all(verdict_of(*gain(larger, knee)[1:]) != "faster" for larger in BATCHES if larger > knee)


def test_fitting_batches_runs_every_size_when_memory_is_plentiful():
    ran = []
    assert fitting_batches(ran.append, [1, 2, 4], torch.device("cpu"), memory_fraction=1.0) == ([1, 2, 4], None)
    assert ran == [1, 2, 4]


def test_fitting_batches_stops_at_an_out_of_memory_batch():
    def run(size: int) -> None:
        if size >= 4:
            raise torch.OutOfMemoryError("simulated")

    assert fitting_batches(run, [1, 2, 4, 8], torch.device("cpu"), 1.0) == ([1, 2], "batch 4 ran out of device memory")


def test_fitting_batches_stops_before_a_batch_predicted_not_to_fit():
    ran = []
    # a negative share of free memory: any prediction (even 0 bytes) is too much, so only the first size runs
    sizes, reason = fitting_batches(ran.append, [1, 2, 4], torch.device("cpu"), memory_fraction=-1.0)
    assert sizes == ran == [1]
    assert reason.startswith("batch 2 would need about") and "of the" in reason and "MiB free" in reason


def test_free_gpu_memory_counts_the_allocators_cached_blocks(pretend_gpu):
    """The allocator keeps a freed batch's blocks reserved and reuses them: mem_get_info alone calls them used."""
    from common.memory import cuda_free_bytes

    gib = 2**30
    pretend_gpu.hold(10 * gib)  # the weights, on an 80 GiB GPU
    fits, why = fitting_batches(lambda size: pretend_gpu.spike(size * 5 * gib), [1, 2, 4, 8], torch.device("cuda", 0),
                                memory_fraction=0.7)
    # after batch 4 the allocator holds 30 GiB (20 of them cached): 50 GiB from the driver + 20 cached = 70 GiB free,
    # and batch 8's predicted 40 GiB is under 70% of that (it was not under 70% of the driver's 50 GiB alone)
    assert cuda_free_bytes(torch.device("cuda", 0)) == 70 * gib  # after batch 8: 30 from the driver + 40 cached
    assert (fits, why) == ([1, 2, 4, 8], None)
