"""tools/gpu_check.py's pass/fail rules, on crafted reports: no GPU needed, which is the point (a GPU run is rare)."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json

import torch

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
LESSON_03 = gpu_check.EXPECTED_SKIPS["03_cpu_gpu_optimization"]


def report(tmp_path, **data):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"failures": {}, "skipped": {}, "partial": False, **data}))
    return path


def test_expected_skips_match_what_the_code_says_on_a_gpu_and_nothing_else(tmp_path):
    lesson = importlib.import_module("03_cpu_gpu_optimization")
    skipped = {"dynamic int8": "PyTorch's dynamic int8 kernels are CPU-only",
               "torch.compile": "--quick (compiling takes about a minute on a small CPU; the full run has it)"}
    assert skipped["torch.compile"] in inspect.getsource(lesson.attention_section)  # the reason the code gives
    ok, note = gpu_check.lesson_verdict(report(tmp_path, skipped=skipped), LESSON_03)
    assert ok and note == "all sections ran (2 expected skips)"
    # an error turned into a skip (a bitsandbytes build that fails on this GPU) fails the row
    ok, note = gpu_check.lesson_verdict(report(tmp_path, skipped={"bitsandbytes 8-bit": "CUDA error: x"}), LESSON_03)
    assert not ok and note == "unexpected skip: bitsandbytes 8-bit: CUDA error: x"


def test_a_lesson_fails_on_a_missing_partial_or_failed_report(tmp_path):
    assert gpu_check.lesson_verdict(tmp_path / "none.json", ()) == (False, "no report written")
    assert gpu_check.lesson_verdict(report(tmp_path, partial=True), ()) == (False, "report is partial")
    ok, note = gpu_check.lesson_verdict(report(tmp_path, failures={"5. Devices": "boom"}), ())
    assert not ok and note == "failed: 5. Devices"


def test_pytest_rows_fail_on_any_skip_failure_or_empty_selection(tmp_path):
    junit = tmp_path / "junit.xml"

    def write(*cases):
        junit.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
        return gpu_check.pytest_verdict(junit, ())

    passed = '<testcase classname="tests.test_cuda" name="test_a"/>'
    skipped = '<testcase classname="tests.test_cuda" name="test_b"><skipped message="no CUDA GPU here"/></testcase>'
    errored = '<testcase classname="tests.test_cuda" name="test_c"><error message="fixture"/></testcase>'
    assert write(passed) == (True, "1 passed, 0 failed, 0 skipped")
    assert write(passed, skipped)[0] is False and "unexpected skip: tests.test_cuda.test_b" in write(passed, skipped)[1]
    assert write(passed, errored) == (False, "1 passed, 1 failed, 0 skipped")
    assert write()[0] is False  # nothing selected is not a pass
    assert gpu_check.pytest_verdict(tmp_path / "missing.xml", ()) == (False, "no JUnit report written")


def test_without_a_gpu_the_check_exits_2_and_touches_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "OUT", tmp_path / "gpu-check")
    assert gpu_check.main() == 2 and not (tmp_path / "gpu-check").exists()
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_a_crashed_lesson_cannot_pass_on_the_previous_runs_report(monkeypatch, tmp_path, capsys):
    out = tmp_path / "gpu-check"
    stale = out / "01_autotokenizer_automodel" / "report.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"failures": {}, "skipped": {}, "partial": False}))  # last week's good run
    monkeypatch.setattr(gpu_check, "OUT", out)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "pretend GPU")
    commands = []

    def crash(name, command, timeout_s):  # every check dies before writing anything
        commands.append(command)
        (out / f"{name}.log").write_text("Segmentation fault")
        return {"check": name, "code": -11, "seconds": 0.1, "log": name}

    monkeypatch.setattr(gpu_check, "run", crash)
    assert gpu_check.main() == 1
    table = capsys.readouterr().out
    assert "01_autotokenizer_automodel  FAIL (-11)  " in table and "no report written" in table
    assert not stale.exists()
    assert all("--device" in c and "cuda" in c and "--source" in c for c in commands[1:-1])
    assert commands[-1][4:6] == ["-m", "cuda"]  # by marker: -k "cuda or gpu" matched test_03_cpu_gpu_optimization.py
