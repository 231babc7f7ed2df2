"""Device choice with availability patched, the environment description, and the CLI's error paths."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common import cli, device
from common.errors import UserError
from tests.conftest import ROOT
from tests.test_robustness import one_line_error


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device, "mps_available", lambda: mps)
    assert device.pick_device("auto").type == expected


def test_asking_for_missing_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        device.pick_device("cuda")


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
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not an error here")
    done = subprocess.run([sys.executable, "01_autotokenizer_automodel.py", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "CUDA" in one_line_error(done.stderr)


def test_thread_counts_cover_one_the_cores_and_oversubscription(monkeypatch):
    monkeypatch.setattr(device.os, "cpu_count", lambda: 6)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert device.thread_counts() == [1, 2, 3, 4, 6, 12]
    assert (device.thread_label(1), device.thread_label(4)) == ("1 thread", "4 threads")


def test_with_threads_sets_the_count_on_every_call():
    before = torch.get_num_threads()
    try:
        seen = device.with_threads(1, torch.get_num_threads)()
        assert seen == 1
    finally:
        torch.set_num_threads(before)


def test_compile_problem_names_the_missing_toolchain(monkeypatch):
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in device.compile_problem(torch.device("cpu"))
    assert "experimental" in device.compile_problem(torch.device("mps"))
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/g++")
    assert device.compile_problem(torch.device("cpu")) is None


def test_first_calls_time_every_batch_and_count_dynamo_graphs():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 2).sum(), backend="eager")
    batches = [{"x": torch.ones(2, 3)}, {"x": torch.ones(2, 3)}]  # the same shape twice: one graph, then reuse
    seconds, graphs = device.first_calls(compiled, batches, torch.device("cpu"))
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert graphs == [1, 0] and device.compiled_graphs() >= 1
    torch._dynamo.reset()


def test_compile_costs_by_hand():
    # first pass: 10 s compiling the first shape, 0.5 s (no new graph), 3 s recompiling, 0.5 s; steady state 1 s,
    # and each compiled pass saves 1 s (interval 0.5-2 s) over eager
    costs = device.compile_costs([10.0, 0.5, 3.0, 0.5], [1, 0, 1, 0], compiled_s=1.0, saving=(1.0, 0.5, 2.0))
    assert (costs["first_call_s"], costs["graphs_first_call"], costs["recompiles"]) == (10.0, 1, 1)
    assert costs["recompile_s"] == 3.0 and costs["overhead_s"] == 13.0
    assert (costs["break_even_passes"], costs["break_even_low"], costs["break_even_high"]) == (13.0, 6.5, 26.0)
    assert device.break_even_text(costs).startswith("compiling pays back after ~13 passes (interval 6-26;")


def test_break_even_says_never_only_when_the_whole_saving_interval_is_at_most_zero():
    unsure = device.break_even_passes(49.0, (0.1, -0.05, 0.2))  # measured gain, but the interval reaches no gain
    assert unsure == {"break_even_passes": 490.0, "break_even_low": 245.0, "break_even_high": None}
    text = device.break_even_text({**unsure, "saving_s": 0.1, "saving_low_s": -0.05, "saving_high_s": 0.2,
                                   "overhead_s": 49.0})
    assert "after ~490 passes" in text and "never" in text.split("(interval")[1]
    never = device.break_even_passes(49.0, (-0.1, -0.3, 0.0))
    assert never == {"break_even_passes": None, "break_even_low": None, "break_even_high": None}
    assert device.break_even_text({**never, "saving_s": -0.1, "saving_low_s": -0.3, "saving_high_s": 0.0,
                                   "overhead_s": 49.0}).startswith("compiling never pays back")
    slower_maybe = device.break_even_passes(49.0, (-0.01, -0.1, 0.1))  # estimate loses, the interval allows a gain
    assert slower_maybe["break_even_passes"] is None and slower_maybe["break_even_low"] == 490.0
