"""Device choice (cuda > mps > cpu) and a description of the machine the numbers came from."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import psutil
import torch

from common.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """True when Apple's Metal backend can run tensors here."""
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(requested: str = "auto") -> torch.device:
    """The best available device for "auto", or the one asked for, failing clearly when it is absent."""
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise UserError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {requested} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device auto or cpu (README: 'Using a GPU' explains the CUDA install)"
        )
    if requested == "mps" and not mps_available():
        raise UserError("--device mps asked for, but Apple's MPS backend is not available here; use auto or cpu")
    return torch.device(requested)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so that a timer measures the work, not the launch."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


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


def gpu_description(device: torch.device) -> dict | None:
    """Name, memory and compute capability of the CUDA GPU in use, or None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
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
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "bitsandbytes": package_version("bitsandbytes"),
        "accelerate": package_version("accelerate"),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
