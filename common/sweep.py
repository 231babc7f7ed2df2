"""Batch-size sweeps: which batch sizes fit in memory, and the knee where throughput stops growing with them."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import psutil
import torch

from common.memory import MIB, CudaPeak, PeakRSSSampler, cleanup, cuda_free_bytes, rss_bytes
from common.meter import verdict_of


def fitting_batches(run: Callable[[int], Any], sizes: Sequence[int], device: torch.device,
                    memory_fraction: float) -> tuple[list[int], str | None]:
    """Run one batch per size, smallest first, until the next is predicted (linearly) to need > memory_fraction of
    free memory or a batch runs out of device memory; the sizes that ran, and why it stopped (None: all ran)."""
    fits, baseline, on_cuda = [], rss_bytes(), device.type == "cuda"
    for size, next_size in zip(sizes, [*sizes[1:], 0]):
        try:
            with CudaPeak(device) as cuda, PeakRSSSampler() as rss:
                run(size)
        except torch.OutOfMemoryError:
            cleanup()
            return fits, f"batch {size} ran out of device memory"
        fits.append(size)
        # RSS only grows while the allocator keeps freed blocks, so on CPU this overestimates: the safe side
        need = max(cuda.delta_bytes if on_cuda else rss.peak_bytes - baseline, 0) * next_size / size
        free = cuda_free_bytes(device) if on_cuda else psutil.virtual_memory().available
        if next_size and need > memory_fraction * free:
            return fits, (f"batch {next_size} would need about {need / MIB:,.0f} MiB, more than "
                          f"{memory_fraction:.0%} of the {free / MIB:,.0f} MiB free")
    return fits, None


def find_knee(sizes: Sequence[int], gain: Callable[[int, int], tuple[float, float, float]]) -> int | None:
    """The smallest batch size that no larger one beats, or None while the largest still beats the one before it.

    gain(larger, smaller) is the throughput ratio with its interval (estimate, low, high); a larger size beats a
    smaller one when that interval says "faster" (common.meter.verdict_of). So the knee never contradicts the best
    measured throughput: any size above the knee is within the noise of it, or slower.
    """
    for index, size in enumerate(sizes):
        if not any(verdict_of(*gain(larger, size)[1:]) == "faster" for larger in sizes[index + 1:]):
            return None if index == len(sizes) - 1 and index > 0 else size
    return None
