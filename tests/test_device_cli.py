"""Device choice with availability patched, the environment description, and the CLI's error paths."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace
import sys

import pytest
import torch

from common import cli, device
from common.errors import UserError
from tests.conftest import ROOT, PretendGpu
from tests.test_robustness import one_line_error


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    if cuda:
        PretendGpu().install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device, "mps_available", lambda: mps)
    assert device.pick_device("auto").type == expected


def test_asking_for_missing_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        device.pick_device("cuda")


def test_a_cuda_device_always_carries_its_index_and_a_missing_one_is_a_user_error(pretend_gpu, tmp_path):
    """The model's device_map, its inputs and the memory counters must name one GPU: "cuda" alone lets transformers
    pick LOCAL_RANK or 0 while inputs go to the current device. On 2 GPUs cuda:7 was an AssertionError traceback."""
    assert device.pick_device("cuda") == torch.device("cuda", 0) == device.pick_device("auto")
    assert device.pick_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("cuda:7", "cuda:2", "cuda:x", "cuda:-1", "cuda:"):
        with pytest.raises(UserError, match=r"has 2 CUDA GPU\(s\), so use cuda or cuda:0 to cuda:1"):
            device.pick_device(bad)
    with pytest.raises(UserError, match="cuda:7"):  # what the CLI turns into one line and exit 2, before any work
        cli.start("/x/05_example.py", cli.base_parser("t").parse_args(["--device", "cuda:7", "--output-dir",
                                                                        str(tmp_path)]))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_native_only_from_capability_8(pretend_gpu, monkeypatch, capability, native):
    """torch.cuda.is_bf16_supported() says True on a T4 (7.5) or V100 (7.0), where bf16 is emulated and slow."""
    pretend_gpu.capability = capability
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.native_bf16(torch.device("cuda", 0)) is native
    assert device.native_bf16(torch.device("cpu")) is False


def test_gpu_description_names_the_gpu_its_capability_and_driver(pretend_gpu, monkeypatch):
    props = type("Props", (), {"name": "Tesla T4", "total_memory": 15 * 2**30, "major": 7, "minor": 5})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(device, "nvidia_driver", lambda: "550.54.15")
    gpu = device.describe_environment(torch.device("cuda", 0))["gpu"]
    assert gpu == {"name": "Tesla T4", "memory_gib": 15.0, "capability": "7.5", "bf16_native": False,
                   "driver": "550.54.15", "cuda": torch.version.cuda}


def test_environment_records_the_fp32_matmul_precision():
    """With "high", a GPU runs fp32 matmuls as TF32: the "fp32" baseline means something else."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert device.describe_environment(torch.device("cpu"))["float32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cuda_matmul_flops_counts_back_to_back_calls_between_events(monkeypatch):
    """GPU time from CUDA events around `calls` queued matmuls, best of the repeats; `meta` tensors stand in for the
    GPU's, and the events answer fixed times, so the arithmetic is what is checked."""
    matmuls, times = [], iter([4.0, 2.0, 3.0])  # milliseconds per batch of calls

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream=None):
            self.at = len(matmuls)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            assert end.at - self.at == 10  # exactly the timed calls, queued between the two events
            return next(times)

    real_mm = torch.mm
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch, "mm", lambda *a, **k: matmuls.append(1) or real_mm(*a, **k))
    flops = device.cuda_matmul_flops(torch.device("meta"), size=64, calls=10, repeats=3)
    assert flops == 2 * 64**3 * 10 / 0.002 and len(matmuls) == 1 + 3 * 10


def test_asking_for_missing_mps_or_an_unknown_device_fails(monkeypatch):
    monkeypatch.setattr(device, "mps_available", lambda: False)
    with pytest.raises(UserError, match="MPS"):
        device.pick_device("mps")
    with pytest.raises(UserError, match="unknown device"):
        device.pick_device("tpu")


def test_environment_names_versions_threads_and_cpu():
    env = device.describe_environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__
    assert env["transformers"].startswith("5.")
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["logical_cores"] >= 1 and env["cpu"]
    assert env["gpu"] is None


def test_parser_turns_bad_options_into_user_errors():
    parser = cli.base_parser("test")
    with pytest.raises(UserError, match="unrecognized arguments"):
        parser.parse_args(["--no-such-option"])
    with pytest.raises(UserError, match="invalid choice"):
        parser.parse_args(["--source", "internet"])


def test_start_applies_threads_and_the_parser_rejects_zero(tmp_path):
    parser = cli.base_parser("test")
    before = torch.get_num_threads()
    try:
        ctx = cli.start("/x/05_example.py", parser.parse_args(["--threads", "1", "--output-dir", str(tmp_path)]))
        assert torch.get_num_threads() == 1
        assert ctx.out_dir == tmp_path and ctx.report.script == "05_example"
        ctx.close()
        with pytest.raises(UserError, match="argument --threads: must be from 1 to"):
            parser.parse_args(["--threads", "0"])
    finally:
        torch.set_num_threads(before)


def test_run_turns_user_error_into_exit_2(capsys):
    def failing_main(argv):
        raise UserError("no such model 'x'")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(failing_main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: no such model 'x'"


def test_script_with_missing_cuda_exits_2_with_one_line_and_no_traceback():
    """One stderr line also means no import-time noise: 01 imports transformers' pipeline, which imports torchao,
    whose CUDA-only kernels log a warning each unless `common` quieted them first."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not an error here")
    done = subprocess.run([sys.executable, "01_autotokenizer_automodel.py", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "CUDA" in one_line_error(done.stderr)


def test_compile_problem_names_the_missing_toolchain(monkeypatch):
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in device.compile_problem(torch.device("cpu"))
    assert "experimental" in device.compile_problem(torch.device("mps"))
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/g++")
    assert device.compile_problem(torch.device("cpu")) is None


def test_timed_once_waits_for_the_queued_work_before_stopping_the_clock(monkeypatch):
    events = []
    monkeypatch.setattr(device, "synchronize", lambda where: events.append(("synchronize", str(where))))
    seconds = device.timed_once(lambda: events.append(("run", None)), torch.device("cuda", 0))
    assert events == [("run", None), ("synchronize", "cuda:0")] and seconds >= 0


def test_record_load_records_a_pipelines_model_and_returns_the_pipeline():
    recorded, model = [], torch.nn.Linear(2, 2)
    ctx = SimpleNamespace(record=recorded.append)
    where = SimpleNamespace(info=lambda loaded, seconds: (loaded, seconds >= 0))
    made = cli.Context.record_load(ctx, where, lambda: SimpleNamespace(model=model))
    assert made.model is model and recorded == [(model, True)]
    assert cli.Context.record_load(ctx, where, lambda: model) is model and recorded[-1] == (model, True)
