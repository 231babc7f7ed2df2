"""Shared test helpers: PNG signature check and importing the digit-named lesson scripts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from common.meter import SAME_BAND

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """True when the file starts with the 8-byte PNG signature and has more than a header."""
    data = Path(path).read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


def verdict_of(low: float, high: float) -> str:
    """The verdict a speed-up interval must give (the meter's rule, restated so a drift in either shows)."""
    if low > 1 + SAME_BAND:
        return "faster"
    if high < 1 / (1 + SAME_BAND):
        return "slower"
    if 1 / (1 + SAME_BAND) <= low and high <= 1 + SAME_BAND:
        return "same" if low <= 1 <= high else "negligible"
    return "inconclusive"


UNDECIDED_WORDS = {"same": "no measurable difference", "negligible": "within +-3%: too small to matter",
                   "inconclusive": "inconclusive"}


def expected_sentence(a: str, b: str, verdict: str, speedup: float) -> str:
    """The start of the line printed for a vs b: the verdict in its words, with the ratio."""
    if verdict in UNDECIDED_WORDS:
        return f"{a} vs {b}: {UNDECIDED_WORDS[verdict]} ({speedup:.2f}x, interval"
    return f"{a} is {speedup:.2f}x as fast as {b}: {verdict} (interval"


def cuda_test(function):
    """A test that needs a real CUDA GPU: marked `cuda` (what `make gpu-check` selects), skipped with why elsewhere."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the GPU paths cannot run")
    return pytest.mark.cuda(skip(function))


def load_script(stem: str):
    """Import a lesson script (its name starts with a digit, so `import` cannot)."""
    spec = importlib.util.spec_from_file_location(f"lesson_{stem}", ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def png_ok():
    return is_png


class PretendGpu:
    """A CUDA allocator and GPU in plain Python, so the GPU paths run on a CPU-only torch: `hold` and `spike` move its
    counters as a model and a forward pass would; capability and memory are what a test says."""

    def __init__(self, count: int = 2, capability: tuple[int, int] = (8, 0), total: int = 80 * 2**30) -> None:
        self.count, self.capability, self.total = count, capability, total
        self.allocated = self.reserved = self.peak = self.peak_reserved = 0
        self.resets = 0

    def hold(self, nbytes: int) -> None:
        """Keep nbytes more allocated (weights loaded), reserving as the caching allocator would."""
        self.allocated += nbytes
        self.reserved = max(self.reserved, self.allocated)
        self.peak, self.peak_reserved = max(self.peak, self.allocated), max(self.peak_reserved, self.reserved)

    def spike(self, nbytes: int) -> None:
        """Allocate nbytes and free them again (a forward pass's activations): the peak moves, the level does not."""
        self.hold(nbytes)
        self.allocated -= nbytes

    def reset_peak(self, device=None) -> None:
        self.resets += 1
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def install(self, monkeypatch) -> "PretendGpu":
        """Patch torch.cuda's device and memory queries to answer from this object."""
        import torch

        cuda = torch.cuda
        for name, value in {
            "is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: self.count,
            "current_device": lambda: 0, "synchronize": lambda device=None: None,
            "get_device_capability": lambda device=None: self.capability,
            "reset_peak_memory_stats": self.reset_peak,
            "memory_allocated": lambda device=None: self.allocated,
            "memory_reserved": lambda device=None: self.reserved,
            "max_memory_allocated": lambda device=None: self.peak,
            "max_memory_reserved": lambda device=None: self.peak_reserved,
            "mem_get_info": lambda device=None: (self.total - self.reserved, self.total),
            "empty_cache": lambda: setattr(self, "reserved", self.allocated),
        }.items():
            monkeypatch.setattr(cuda, name, value)
        return self


@pytest.fixture
def pretend_gpu(monkeypatch):
    """An 80 GiB capability-8.0 GPU pair as far as torch.cuda's queries go (see PretendGpu)."""
    return PretendGpu().install(monkeypatch)
