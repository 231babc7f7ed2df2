"""Nothing lost, nothing crashes (issue 12): bad output folders, disk full at the end, SIGTERM and Ctrl-C, numeric
option bounds, concurrent cache builds and two runs on one output folder. Signals and concurrency use real processes."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import cli, models, report
from common.errors import Terminated
from common.report import Report
from tests.conftest import ROOT

LESSON = "01_autotokenizer_automodel.py"  # the quickest lesson to reach its first section


def lesson_process(out_dir: Path, *extra: str) -> subprocess.Popen:
    """Start lesson 01 (--quick, bundled, one thread) with unbuffered output so the test can watch its progress.

    A test run started in the background has SIGINT ignored, and an ignored signal stays ignored in children; a
    Python-level handler is reset to the default by exec instead, so the lesson gets Ctrl-C as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, LESSON, "--quick", "--source", "bundled", "--threads", "1",
                                 "--output-dir", str(out_dir), *extra], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for_first_section(process: subprocess.Popen, timeout_s: float = 180) -> list[str]:
    """Read stdout until the first section heading (a line of '='), and keep draining it afterwards."""
    seen: list[str] = []
    started = threading.Event()

    def reader() -> None:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("=" * 20):
                started.set()
        started.set()  # end of output: the process has exited

    threading.Thread(target=reader, daemon=True).start()
    assert started.wait(timeout_s), "the lesson printed no section heading"
    assert process.poll() is None, "".join(seen) + process.stderr.read()
    return seen


def one_line_error(stderr: str) -> str:
    """The single stderr line of a refused run (asserting it is one line and no traceback)."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def tiny_main(body=None, roles=()):
    """A lesson-shaped main on the shared parser: start (needing the models of `roles`), one section (body),
    finish."""
    def main(argv):
        ctx = cli.start("/x/05_example.py", cli.base_parser("test").parse_args(argv), roles=roles)
        ctx.report.run_section("1. only", "why", body or (lambda: {"value": 1}))
        return ctx.finish()

    return main


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    return exit_info.value.code


# ------------------------------------------------------------------------------------ 1. the output folder


@pytest.mark.parametrize("where", ["/proc/forbidden", "inside-a-file/out"])
def test_output_dir_that_cannot_be_created_is_one_line_and_exit_2(tmp_path, capsys, where):
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    (tmp_path / "inside-a-file").write_text("x")
    target = Path(where) if where.startswith("/") else tmp_path / where
    assert exit_code(tiny_main(), ["--output-dir", str(target)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: output folder {target} cannot be created or written to (")
    assert line.endswith("pass --output-dir a folder you can write to")


def test_output_dir_without_free_space_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * cli.MIB))
    assert exit_code(tiny_main(), ["--output-dir", str(tmp_path)]) == 2
    assert one_line_error(capsys.readouterr().err) == (f"error: output folder {tmp_path} has 3.0 MiB free; a run needs "
                                                       "16 MiB for its charts and reports")


def test_a_good_folder_is_created_probed_and_freed_once_the_report_is_final(tmp_path):
    out = tmp_path / "new" / "nested"
    assert tiny_main()(["--output-dir", str(out)]) == 0  # as the lesson tests call main: finish() frees the folder
    assert sorted(p.name for p in out.iterdir()) == [cli.LOCK_NAME, "report.json", "report.md"]  # probe removed
    cli.claim_output_dir(out, "the next run").close()


def test_disk_full_at_the_end_writes_the_report_to_a_temp_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    real_write = report.atomic_write

    def full_disk(path, text):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text)

    monkeypatch.setattr(report, "atomic_write", full_disk)
    rep = Report("05_example", out, {})
    rep.run_section("1. measured", "why", lambda: {"p50_ms": 12.5})
    rep.add_rows("1. measured", [{"name": "x", "p50_ms": 12.5}])
    assert rep.finish() == 0
    (fallback,) = (tmp_path / "tmp").iterdir()
    assert fallback.name.startswith("05_example-report-")
    assert json.loads((fallback / "report.json").read_text())["sections"]["1. measured"] == {"p50_ms": 12.5}
    assert {p.name for p in fallback.iterdir()} == {"report.json", "report.md", "results.csv"}
    captured = capsys.readouterr()
    assert (f"[report] could not write to {out} (No space left on device); the report goes to {fallback} instead"
            in captured.err)
    assert f"wrote to {fallback}: report.json, report.md, results.csv" in " ".join(captured.out.split())


def test_output_folder_gone_during_the_run_still_keeps_the_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report.tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "out"

    def section_that_loses_the_folder():
        for path in out.iterdir():
            path.unlink()
        out.rmdir()
        out.write_text("someone replaced the folder with a file")
        return {"tokens_per_s": 99.0}

    assert exit_code(tiny_main(section_that_loses_the_folder), ["--output-dir", str(out)]) == 0
    (fallback,) = tmp_path.glob("05_example-report-*")
    assert json.loads((fallback / "report.json").read_text())["sections"]["1. only"] == {"tokens_per_s": 99.0}
    assert f"the report goes to {fallback} instead" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 2. SIGTERM and Ctrl-C


@pytest.mark.parametrize(("sig", "code", "reason"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                     (signal.SIGINT, 130, "interrupted by the user (Ctrl-C)")])
def test_sigterm_and_ctrl_c_on_a_real_lesson_leave_a_partial_report(tmp_path, sig, code, reason):
    """The signal arrives as the lesson's first section starts (the lesson has several after it): 143 for SIGTERM,
    130 for SIGINT, with report.json marked partial."""
    out = tmp_path / "out"
    process = lesson_process(out)
    try:
        wait_for_first_section(process)
        process.send_signal(sig)
        assert process.wait(timeout=120) == code
        data = json.loads((out / "report.json").read_text())
        assert data["partial"] is True and data["interrupted"] == reason
        assert set(data["failures"].values()) <= {reason}  # empty when the signal fell between two sections
        assert f"Partial report: the run was {reason}" in (out / "report.md").read_text()
        stderr = process.stderr.read()
        assert f"{reason}: the report written so far is marked partial: {out / 'report.json'}" in stderr
        assert "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()


SIGTERM_IN_A_SECTION = """
import json, os, signal, sys, time
from tests.test_robustness import exit_code, tiny_main

def section():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends
    return {"never": True}

before = signal.getsignal(signal.SIGTERM)
code = exit_code(tiny_main(section), ["--output-dir", sys.argv[1]])
print(json.dumps({"code": code, "handler_restored": signal.getsignal(signal.SIGTERM) is before}))
"""


def test_real_sigterm_inside_a_section_exits_143_and_restores_the_handler(tmp_path):
    # cli.run's own handler, in a fresh interpreter: inside pytest's process, after the whole suite had loaded its
    # native runtimes, this kill crashed pytest itself (segfault) in two runs, though the same code alone never did.
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_SECTION, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 143, "handler_restored": True}, done.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is True and data["failures"] == {"1. only": "terminated (SIGTERM)"}


def test_stop_between_sections_still_writes_the_partial_report(tmp_path, capsys):
    def main(argv):
        ctx = cli.start("/x/05_example.py", cli.base_parser("test").parse_args(argv))
        ctx.report.run_section("1. done", "why", lambda: {"value": 1})
        raise Terminated  # arrives after a section ended, before the next began

    assert exit_code(main, ["--output-dir", str(tmp_path)]) == 143
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is True and data["interrupted"] == "terminated (SIGTERM)"
    assert data["sections"] == {"1. done": {"value": 1}} and data["failures"] == {}
    assert "terminated (SIGTERM): the report written so far is marked partial" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 3. numeric options


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threads", "100000", "must be from 1 to {limit} ({per}x this machine's {cores} logical cores), got 100000"),
    ("--threads", "0", "must be from 1 to {limit} ({per}x this machine's {cores} logical cores), got 0"),
    ("--threads", "two", "must be a whole number from 1 to {limit} ({per}x this machine's {cores} logical cores), "
                         "got 'two'"),
    ("--seed", "-1", "must be from 0 to 4294967295, got -1"),
    ("--seed", "4294967296", "must be from 0 to 4294967295, got 4294967296"),
])
def test_numeric_options_out_of_range_exit_2_with_the_allowed_range(tmp_path, capsys, option, value, message):
    cores = os.cpu_count()
    expected = message.format(limit=cli.THREADS_PER_CORE_LIMIT * cores, per=cli.THREADS_PER_CORE_LIMIT, cores=cores)
    assert exit_code(tiny_main(), [option, value, "--output-dir", str(tmp_path / "out")]) == 2
    prog = cli.base_parser("test").prog
    assert one_line_error(capsys.readouterr().err) == f"error: {prog}: argument {option}: {expected} (see --help)"
    assert not (tmp_path / "out").exists()  # refused before any work


def test_threads_at_the_bounds_are_accepted():
    parser = cli.base_parser("test")
    limit = cli.THREADS_PER_CORE_LIMIT * os.cpu_count()
    assert parser.parse_args(["--threads", "1"]).threads == 1
    assert parser.parse_args(["--threads", str(limit)]).threads == limit
    assert parser.parse_args(["--seed", "0"]).seed == 0


# ------------------------------------------------------------------------------------ 4. the section heading


def test_a_multi_line_docstring_as_why_prints_cleanly(tmp_path, capsys):
    def section():
        """Models read integer ids, not text:
        see what the tokenizer keeps, drops and pads.
        """
        return 1

    Report("05_example", tmp_path, {}).run_section("1. doc", section.__doc__, section)
    assert capsys.readouterr().out == ("\n" + "=" * 78 + "\n1. doc\n" + "=" * 78 + "\nModels read integer ids, not "
                                       "text:\nsee what the tokenizer keeps, drops and pads.\n\n[1. doc: 0.0 s]\n")


# ------------------------------------------------------------------------------------ 5. concurrent cache builds

CACHE_BUILDER = """
import json, sys, time
from pathlib import Path
from common import models

me, other, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def build(target):
    with open(root / "builds.log", "a") as log:
        log.write(me + "\\n")
    waited = time.time() + 120
    while time.time() < waited:  # until the other process waits on our lock: filelock polls, so watch its line
        if "another process is building" in (root / f"stdout-{other}.txt").read_text():
            break
        time.sleep(0.05)
    for part in range(4):  # slow and several files: a reader without the lock would see a half-written folder
        (target / f"part{part}.bin").write_bytes(bytes([part]) * 100_000)
        time.sleep(0.2)

folder = models.ensure_cached("slow-thing", {"v": 1}, build)
parts = {p.name: sorted(set(p.read_bytes())) for p in folder.glob("part*.bin")}
print(json.dumps({"folder": str(folder), "problem": models.cache_problem(folder, {"v": 1}), "parts": parts}))
"""


def test_two_processes_building_one_cache_entry_build_it_once(tmp_path):
    """The builder holds the lock until the other process has said it waits, so the waiter always waits."""
    env = {**os.environ, "WEEK3_MODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    processes = []
    for me, other in (("a", "b"), ("b", "a")):
        with open(tmp_path / f"stdout-{me}.txt", "w") as stdout:  # the child keeps its own copy of the descriptor
            processes.append(subprocess.Popen([sys.executable, "-c", CACHE_BUILDER, me, other, str(tmp_path)],
                                              cwd=ROOT, env=env, text=True, stdout=stdout, stderr=subprocess.PIPE))
    errors = [process.communicate(timeout=180)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    outputs = [(tmp_path / f"stdout-{me}.txt").read_text() for me in "ab"]
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1
    waiter = outputs[0 if builders == ["b"] else 1]
    assert "[cache] another process is building" in waiter
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout in outputs]
    expected_parts = {f"part{i}.bin": [i] for i in range(4)}
    for result in results:
        assert result == {"folder": str(tmp_path / "cache" / "slow-thing"), "problem": None, "parts": expected_parts}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".slow-thing.lock", "slow-thing"]


def test_leftovers_of_a_killed_build_are_cleared_under_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(tmp_path))
    (tmp_path / ".thing.tmp-999999").mkdir()
    (tmp_path / ".thing.tmp-999999" / "half.bin").write_bytes(b"x")
    folder = models.ensure_cached("thing", {"v": 1}, lambda target: (target / "a.bin").write_bytes(b"a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]
    assert models.cache_problem(folder, {"v": 1}) is None


# ------------------------------------------------------------------------------------ 6. a file or a busy folder


def test_real_lessons_refuse_a_file_or_a_busy_folder_before_any_work(tmp_path):
    """Two real lessons at once: one given a file as --output-dir, one given a folder this process holds (cli.start).
    Both exit 2 with one line before any section runs; the held folder gets no report."""
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    busy = tmp_path / "busy"
    ctx = cli.start("/x/05_example.py", cli.base_parser("test").parse_args(["--output-dir", str(busy)]))
    try:
        processes = [subprocess.Popen([sys.executable, LESSON, "--quick", "--output-dir", str(out)], cwd=ROOT,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for out in (taken, busy)]
        (file_out, file_err), (busy_out, busy_err) = [process.communicate(timeout=180) for process in processes]
    finally:
        ctx.close()
    assert [process.returncode for process in processes] == [2, 2]
    assert one_line_error(file_err) == (f"error: output folder {taken} is a file, not a folder; "
                                        "pass --output-dir a folder")
    assert taken.read_text() == "not a folder"
    line = one_line_error(busy_err)
    assert line.startswith(f"error: output folder {busy} is in use by another run (05_example, pid {os.getpid()},")
    assert line.endswith("wait for it to finish or pass another --output-dir")
    assert "=" * 20 not in file_out + busy_out  # no section ran
    assert not (busy / "report.json").exists()
    cli.start("/x/05_example.py", cli.base_parser("test").parse_args(["--output-dir", str(busy)])).close()  # free again

