"""common.sweep: which batch sizes fit (memory stop rule) and the knee of a throughput curve."""
from __future__ import annotations

import torch

from common.sweep import find_knee, fitting_batches

BATCHES = [1, 2, 4, 8, 16, 32, 64]


def test_find_knee_on_synthetic_curves():
    assert find_knee(BATCHES, [1, 2, 4, 8, 8, 8, 8]) == 8  # linear scaling, then flat
    assert find_knee(BATCHES, [10, 19, 24, 25, 25.5, 25.6, 25.7]) == 4  # early saturation
    assert find_knee(BATCHES, [1, 2, 4, 8, 9, 6, 3]) == 16  # a peak: the best batch is the bend
    assert find_knee(BATCHES, BATCHES) is None  # still doubling: no knee yet
    assert find_knee(BATCHES, [5] * 7) is None  # flat: nothing bends
    assert find_knee([1, 2, 4, 8], [100, 102, 99, 101]) is None  # flat with noise: normalising must not invent a bend
    assert find_knee(BATCHES, [9, 8, 7, 6, 5, 4, 3]) is None  # falling: batching only costs
    assert find_knee([1, 2], [1, 2]) is None  # too few points
    assert find_knee(BATCHES, [10, 19, 24, 25, 25.5, 25.6, 25.7], min_bend=0.9) is None  # bend below the threshold


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
