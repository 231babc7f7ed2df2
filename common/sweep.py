"""Batch-size sweeps: which batch sizes fit in memory, and the knee where throughput stops growing with them."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import psutil
import torch

from common.memory import MIB, CudaPeak, PeakRSSSampler, cleanup, cuda_free_bytes, rss_bytes

MIN_KNEE_BEND = 0.1  # a curve must bulge this far (in normalised units) above its chord to have a knee
MIN_KNEE_RISE = 0.1  # ... and rise by this share of its top from the first point: flat noise has no knee


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


def find_knee(xs: Sequence[float], ys: Sequence[float], min_bend: float = MIN_KNEE_BEND,
              min_rise: float = MIN_KNEE_RISE) -> float | None:
    """The x where y stops growing in proportion (Kneedle on a log2 x axis), or None for a curve without a clear bend.

    Normalise both axes to [0, 1], draw the chord from the first to the last point, and return the point that
    bulges furthest above it, if it bulges at least min_bend. Normalising would blow a flat curve's noise up into a
    bend, so a curve that never rises by min_rise of its top above its first point has no knee.
    """
    if len(xs) != len(ys) or len(xs) < 3 or min(xs) <= 0:
        return None
    x = np.log2(np.asarray(xs, dtype=float))
    y = np.asarray(ys, dtype=float)
    if x[-1] == x[0] or y.max() - y[0] < min_rise * y.max():
        return None
    x_norm = (x - x[0]) / (x[-1] - x[0])
    y_norm = (y - y.min()) / (y.max() - y.min())
    bulge = y_norm - (y_norm[0] + (y_norm[-1] - y_norm[0]) * x_norm)
    best = int(np.argmax(bulge))
    return xs[best] if bulge[best] >= min_bend else None
