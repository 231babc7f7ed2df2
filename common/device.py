"""Device choice (cuda > mps > cpu) and a description of the machine the numbers came from."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import time
from importlib import metadata
from typing import Any, Callable, TypeVar

import psutil
import torch

from common.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
T = TypeVar("T")


def mps_available() -> bool:
    """True when Apple's Metal backend can run tensors here."""
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(requested: str = "auto") -> torch.device:
    """The best available device for "auto", or the one asked for, failing clearly when it is absent.

    A CUDA device always carries its index (the current GPU for "cuda"), so the model, its inputs and the memory
    counters all name the same GPU.
    """
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise UserError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {requested} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device auto or cpu (README: 'Using a GPU' explains the CUDA install)"
        )
    if requested.startswith("cuda"):
        index = requested.partition(":")[2]
        count = torch.cuda.device_count()
        if requested != "cuda" and not (index.isdigit() and int(index) < count):
            raise UserError(f"--device {requested}: this machine has {count} CUDA GPU(s), "
                            f"so use cuda or cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    if requested == "mps" and not mps_available():
        raise UserError("--device mps asked for, but Apple's MPS backend is not available here; use auto or cpu")
    return torch.device(requested)


def indexed(device: torch.device | str) -> torch.device:
    """The device with its index when it is a GPU ("cuda" names the current one), as every CUDA call should get it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def native_bf16(device: torch.device) -> bool:
    """True on a CUDA GPU with bf16 tensor cores (capability 8.0+); is_bf16_supported() also counts emulation."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def cuda_matmul_flops(device: torch.device, size: int = 4096, calls: int = 50, dtype: torch.dtype = torch.float32,
                      repeats: int = 3) -> float:
    """FLOP/s of back-to-back square matmuls on a GPU, timed by CUDA events (best of `repeats` batches of `calls`).

    The events bracket the GPU's own work: the host queues every call before the first finishes, so launch and sync
    overhead do not count, and 4096 is large enough to keep every SM of a data-centre GPU busy.
    """
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.mm(a, b)  # warm-up: cuBLAS picks its kernel here
    stream, best_ms = torch.cuda.current_stream(device), float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(calls):
            torch.mm(a, b, out=out)
        end.record(stream)
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    return 2 * size**3 * calls / (best_ms / 1e3)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so that a timer measures the work, not the launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # this run's GPU, which need not be the current one
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_once(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of `run`, queued device work included: a first call is not repeatable, so one sample."""
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to platform's answer."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide low-precision speed (bf16, AMX, AVX-512 VNNI), as the kernel reports them."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "fma"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return sorted(wanted.intersection(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as NVML reports it, or None where NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no pynvml, no driver, or an NVML too old: the version is simply not known
        return None
    return version.decode() if isinstance(version, bytes) else version


def gpu_description(device: torch.device) -> dict | None:
    """Name, memory, compute capability and driver of the CUDA GPU in use, or None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16_native": (props.major, props.minor) >= (8, 0),
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
    }


def describe_environment(device: torch.device) -> dict:
    """Everything a reader needs to judge a number: machine, device, threads and library versions."""
    return {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_description(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "high" lets fp32 matmuls run as TF32
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "bitsandbytes": package_version("bitsandbytes"),
        "accelerate": package_version("accelerate"),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }


def thread_label(count: int) -> str:
    """"1 thread", "4 threads": how a thread count is named in tables and verdicts."""
    return f"{count} thread{'s' if count > 1 else ''}"


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on this device here, or None."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
        return "no C++ compiler on PATH (inductor needs g++ or clang++ for CPU kernels)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (inductor's GPU kernels need it)"
    if device.type == "mps":
        return "inductor's MPS backend is experimental; not measured"
    return None
