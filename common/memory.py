"""Memory cleanup, snapshots, and a peak-RSS sampler that catches peaks a before/after difference misses."""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import psutil
import torch

_PROCESS = psutil.Process()
MIB = 2**20
# /proc/self/statm costs ~2 µs a read against psutil's ~20 µs, which matters for a sampler on a 2-core machine.
# macOS and Windows have no /proc: rss_bytes falls back to psutil there.
_STATM = os.open("/proc/self/statm", os.O_RDONLY) if os.path.exists("/proc/self/statm") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if _STATM is not None else 0


def rss_bytes() -> int:
    """Resident set size of this process right now."""
    if _STATM is not None:
        return int(os.pread(_STATM, 64, 0).split()[1]) * _PAGE
    return _PROCESS.memory_info().rss


@dataclass(frozen=True)
class MemorySnapshot:
    """Process RSS and CUDA allocator counters at one instant (CUDA fields are 0 without a GPU)."""

    rss_bytes: int
    cuda_allocated_bytes: int = 0
    cuda_reserved_bytes: int = 0


def snapshot(device: torch.device | None = None) -> MemorySnapshot:
    """Read RSS and, when CUDA is initialised, the allocator's bytes on this CUDA device (default: the current one)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = device if device is not None and device.type == "cuda" else None
        return MemorySnapshot(rss_bytes(), torch.cuda.memory_allocated(cuda), torch.cuda.memory_reserved(cuda))
    return MemorySnapshot(rss_bytes())


def snapshot_rows(steps: list[tuple[str, MemorySnapshot]]) -> list[dict[str, object]]:
    """Table rows for named snapshots, in MiB: RSS (also against the first step) and the CUDA allocator's counters."""
    base = steps[0][1].rss_bytes if steps else 0
    return [{"step": step, "rss_mib": snap.rss_bytes / MIB, "rss_vs_start_mib": (snap.rss_bytes - base) / MIB,
             "cuda_allocated_mib": snap.cuda_allocated_bytes / MIB, "cuda_reserved_mib": snap.cuda_reserved_bytes / MIB}
            for step, snap in steps]


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim); False where libc has no such call."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # macOS, musl: the allocator returns memory on its own terms
        return False
    return True


def cleanup(trim: bool = True) -> dict[str, int]:
    """Collect garbage, empty GPU caches and (with trim) the C heap; returns the bytes freed as measured.

    Without the trim, memory freed by Python goes back to glibc's free lists, not to the OS, and RSS does not drop.
    """
    before = snapshot()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    if trim:
        trim_heap()
    after = snapshot()
    return {
        "rss_freed_bytes": before.rss_bytes - after.rss_bytes,
        "cuda_reserved_freed_bytes": before.cuda_reserved_bytes - after.cuda_reserved_bytes,
        "rss_after_bytes": after.rss_bytes,
        "cuda_reserved_after_bytes": after.cuda_reserved_bytes,
    }


def kernel_peak_rss_bytes() -> int | None:
    """The kernel's exact RSS high-water mark for this process (VmHWM), or None where /proc lacks it."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_kernel_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux 4.0+); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


KERNEL_PEAK_METHOD = "kernel high-water mark (VmHWM), exact"
_OPEN_SAMPLERS: list["PeakRSSSampler"] = []  # so a nested sampler's reset of VmHWM loses no outer peak


class PeakRSSSampler:
    """Context manager; `peak_bytes` is the highest RSS inside the block, `method` says how it was measured.

    On Linux it reads the kernel's exact high-water mark, reset on entry: no thread, so it costs the timed code
    nothing (a polling thread waking every few ms takes the GIL from it, which slowed measured calls by 20-35% on
    a busy 2-core machine). Elsewhere (macOS, Windows) it falls back to polling RSS on a thread every `interval_s`.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False
        self.method = ""

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSSSampler":
        self.baseline_bytes = self.peak_bytes = rss_bytes()
        for outer in _OPEN_SAMPLERS:
            outer.peak_bytes = max(outer.peak_bytes, kernel_peak_rss_bytes() or 0)
        self._kernel = kernel_peak_rss_bytes() is not None and reset_kernel_peak_rss()
        self.method = (KERNEL_PEAK_METHOD if self._kernel
                       else f"RSS polled every {self.interval_s * 1e3:g} ms (a shorter peak can be missed)")
        _OPEN_SAMPLERS.append(self)
        if not self._kernel:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _OPEN_SAMPLERS.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._kernel:
            self.peak_bytes = max(self.peak_bytes, kernel_peak_rss_bytes() or 0)
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    @property
    def peak_delta_bytes(self) -> int:
        """How far above the starting RSS the block went at its highest."""
        return self.peak_bytes - self.baseline_bytes


def peak_rss_method() -> str:
    """How PeakRSSSampler measures peaks on this machine, for the report (an empty sampler block finds out)."""
    with PeakRSSSampler() as probe:
        pass
    return probe.method


_OPEN_CUDA_PEAKS: list["CudaPeak"] = []  # so a nested CudaPeak's reset of the counters loses no outer peak


class CudaPeak:
    """Context manager: the CUDA allocator's peak bytes on this device inside the block (0 off CUDA).

    It resets the device's peak counters on entry; an enclosing CudaPeak first takes the peak so far, so they nest
    (the meter keeps one around every timed call).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.baseline_bytes = 0

    def _take_peaks(self) -> None:
        """Fold the counters' peaks since the last reset into this block's."""
        self.allocated_bytes = max(self.allocated_bytes, torch.cuda.max_memory_allocated(self.device))
        self.reserved_bytes = max(self.reserved_bytes, torch.cuda.max_memory_reserved(self.device))

    def __enter__(self) -> "CudaPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for outer in _OPEN_CUDA_PEAKS:
                if outer.device == self.device:
                    outer._take_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            _OPEN_CUDA_PEAKS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _OPEN_CUDA_PEAKS.remove(self)
            torch.cuda.synchronize(self.device)
            self._take_peaks()

    @property
    def delta_bytes(self) -> int:
        """How far above the starting allocation the block went at its highest."""
        return self.allocated_bytes - self.baseline_bytes


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes a new tensor on this GPU can still get: the driver's free memory (mem_get_info) plus the blocks the
    caching allocator reserved but is not using, which it hands out before asking the driver for more."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def kv_cache_factors(config: Any, dtype_bytes: int) -> dict[str, int]:
    """layers x 2 (K and V) x kv_heads x head_dim x bytes, each factor read from the config (an encoder-decoder's
    decoder layers and d_kv included), with their product as formula_bytes: one more token's cache, per sequence."""
    heads = config.num_attention_heads
    factors = {"layers": getattr(config, "num_decoder_layers", None) or config.num_hidden_layers,
               "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "heads": heads,
               "head_dim": getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
               or config.hidden_size // heads, "dtype_bytes": dtype_bytes}
    return {**factors, "formula_bytes": factors["layers"] * 2 * factors["kv_heads"] * factors["head_dim"] * dtype_bytes}


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model stores (parameters, buffers, packed int8/4-bit weights), tied tensors once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and hasattr(value, "__tensor_flatten__"):
            for name in value.__tensor_flatten__()[0]:  # torchao's int8 tensors: no storage, their parts have one
                add(getattr(value, name))
        elif isinstance(value, torch.Tensor):
            # A tied tensor (SmolLM2's LM head is its input embedding) starts at the same address; views of one
            # storage (a fused projection's slices) start at different ones, and each counts.
            size = value.numel() * value.element_size() if value.is_quantized else value.nbytes
            key = (value.data_ptr(), size)
            if key not in seen:
                seen.add(key)
                total += size
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    for value in model.state_dict().values():
        add(value)
    return total


def resident_bytes(device: torch.device) -> int:
    """Memory a model lives in: the CUDA allocator's bytes on a GPU, the process RSS otherwise."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def saved_for_backward_bytes(model: Any, run: Callable[[], Any]) -> int:
    """Exact bytes of activations autograd keeps for a backward pass during `run` (parameters not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()  # held until we have counted, so no saved storage can be freed and its address reused
    total = sum(saved.values())
    del output
    return total
