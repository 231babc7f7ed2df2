"""The pretend-GPU tests' claims checked on a real CUDA GPU (`make gpu-check` runs every `cuda` test; skipped here
without one). Each is small: the lessons' GPU runs are gpu-check's own rows."""
from __future__ import annotations

import torch
from conftest import cuda_test

from common import device, memory
from common.meter import PerformanceMeter

MIB = 2**20


@cuda_test
def test_pick_device_names_the_current_gpu_by_index():
    assert device.pick_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert device.native_bf16(device.pick_device("cuda")) == (torch.cuda.get_device_capability() >= (8, 0))


@cuda_test
def test_cuda_peaks_are_each_workloads_own_above_what_is_held():
    gpu = device.pick_device("cuda")
    held = torch.empty(256 * MIB, dtype=torch.uint8, device=gpu)  # an earlier model
    meter = PerformanceMeter(gpu, warmup=1, min_runs=3, max_runs=3, budget_s=0)
    comparison = meter.compare({"8 MiB": lambda: torch.empty(8 * MIB, dtype=torch.uint8, device=gpu).fill_(1),
                                "64 MiB": lambda: torch.empty(64 * MIB, dtype=torch.uint8, device=gpu).fill_(1)})
    peaks = {name: m.peak_cuda_allocated_bytes / MIB for name, m in comparison.measurements.items()}
    assert 8 <= peaks["8 MiB"] < 64 <= peaks["64 MiB"] < 256
    assert memory.cuda_free_bytes(gpu) >= torch.cuda.mem_get_info(gpu)[0]
    del held


@cuda_test
def test_event_timed_matmul_runs_on_this_gpu():
    flops = device.cuda_matmul_flops(device.pick_device("cuda"), size=2048, calls=10)
    assert 1e11 < flops < 1e16  # between a laptop GPU and anything that exists


