"""Runs where learners are (issue 20): no fcntl and no /proc (Windows, macOS), output piped into head, a model cache
that cannot be written, a damaged file in the Hugging Face cache. A real Windows or macOS machine is not available
here, so those are simulated: fcntl made unimportable, the /proc files our readers open made absent."""
from __future__ import annotations

import json
import mmap
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import IO

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common import cli, device, memory, models
from common.errors import OutputClosed, UserError
from tests.conftest import ROOT
from tests.test_hub_cache import add_to_hub_cache
from tests.test_robustness import LESSON, exit_code, one_line_error, tiny_main

SIMULATED_PLATFORM = r"""
import builtins, os, runpy, sys

sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError, as on Windows


def ours() -> bool:
    # Only our /proc readers lose /proc: psutil's Linux backend (their fallback here) still needs it.
    # Frames: ours <- absent <- the fake open <- its caller.
    return sys._getframe(3).f_globals.get("__name__", "").startswith("common.")


def absent(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith("/proc/") and ours()


def missing(path):
    return FileNotFoundError(2, "No such file or directory (simulated: no /proc)", os.fspath(path))


real_open, real_os_open, real_exists = builtins.open, os.open, os.path.exists


def fake_open(file, *args, **kwargs):
    if absent(file):
        raise missing(file)
    return real_open(file, *args, **kwargs)


def fake_os_open(path, *args, **kwargs):
    if absent(path):
        raise missing(path)
    return real_os_open(path, *args, **kwargs)


def fake_exists(path):
    return False if absent(path) else real_exists(path)


builtins.open, os.open, os.path.exists = fake_open, fake_os_open, fake_exists
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ------------------------------------------------------------------------------------ 1. no /proc


@pytest.fixture
def no_proc(monkeypatch):
    """The /proc files our readers open are absent, as on macOS and Windows (statm is opened at import: unset it).
    psutil's Linux backend, their fallback here, keeps its /proc."""
    real_open = open

    def fake_open(file, *args, **kwargs):
        if str(file).startswith("/proc/") and sys._getframe(1).f_globals.get("__name__", "").startswith("common."):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(memory, "_STATM", None)


def test_rss_without_proc_statm_is_psutils_figure(monkeypatch):
    monkeypatch.setattr(memory, "_STATM", None)
    monkeypatch.setattr(memory, "_PROCESS", SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=123 * memory.MIB)))
    assert memory.rss_bytes() == 123 * memory.MIB


def test_peak_rss_without_proc_polls_catches_a_short_peak_and_says_so(no_proc):
    assert memory.kernel_peak_rss_bytes() is None and memory.reset_kernel_peak_rss() is False
    with memory.PeakRSSSampler(interval_s=0.001) as sampler:
        with mmap.mmap(-1, 200 * memory.MIB) as block:  # freed at once on unmap: only a sampler sees it
            np.frombuffer(block, dtype=np.uint8)[:] = 1
    assert sampler.method == "RSS polled every 1 ms (a shorter peak can be missed)"
    assert sampler.peak_delta_bytes > 180 * memory.MIB
    assert memory.peak_rss_method() == "RSS polled every 5 ms (a shorter peak can be missed)"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_method_on_linux_is_the_kernel_mark():
    assert memory.peak_rss_method() == memory.KERNEL_PEAK_METHOD


def test_cpu_name_and_flags_without_proc_cpuinfo(no_proc, monkeypatch):
    monkeypatch.setattr(device.platform, "processor", lambda: "Apple M2 Pro")
    assert device.cpu_model() == "Apple M2 Pro"
    assert device.cpu_flags() == []
    monkeypatch.setattr(device.platform, "processor", lambda: "")  # what Linux without /proc and some macOS say
    monkeypatch.setattr(device.platform, "machine", lambda: "arm64")
    assert device.cpu_model() == "arm64"


def test_the_environment_says_how_peak_rss_was_measured(tmp_path, no_proc):
    assert tiny_main()(["--output-dir", str(tmp_path)]) == 0
    environment = json.loads((tmp_path / "report.json").read_text())["environment"]
    assert environment["peak_rss_method"] == "RSS polled every 5 ms (a shorter peak can be missed)"
    assert environment["cpu"] == (platform.processor() or platform.machine())


# ------------------------------------------------------------------------------------ 2. signals


def test_a_platform_without_sigterm_still_runs(tmp_path, monkeypatch):
    monkeypatch.delattr(signal, "SIGTERM")
    assert exit_code(tiny_main(), ["--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["partial"] is False


# ------------------------------------------------------------------------------------ 3. locks without fcntl

LOCKS_WITHOUT_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows
from pathlib import Path
from common import cli, models
from common.errors import UserError

out = Path(sys.argv[1])
held = cli.claim_output_dir(out, "first")
try:
    cli.claim_output_dir(out, "second")
except UserError as error:
    print(error)
held.close()
cli.claim_output_dir(out, "third").close()
folder = models.ensure_cached("thing", {"v": 1}, lambda target: (target / "a.bin").write_bytes(b"a"))
print(type(held.lock).__name__, models.cache_problem(folder, {"v": 1}), sorted(p.name for p in folder.parent.iterdir()))
"""


def test_locks_work_without_fcntl(tmp_path):
    """filelock takes its portable path: the second claim is refused with its holder, the folder is free after."""
    out = tmp_path / "out"
    env = {**os.environ, "WEEK3_MODEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", LOCKS_WITHOUT_FCNTL, str(out)], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    refused, locks = result.stdout.strip().splitlines()
    assert refused.startswith(f"output folder {out} is in use by another run (first, pid ")
    assert locks == "SoftFileLock None ['thing']"  # a soft lock file is removed on release
    assert sorted(p.name for p in out.iterdir()) == []


# ------------------------------------------------------------------------------------ 4. a lesson, portable


def copy_cache(name: str, folder: Path, into: Path) -> None:
    """A built cache folder under another cache root, by hard links where the filesystem allows (no 500 MB copy)."""
    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(folder, into / name, copy_function=link)


def test_lesson_01_quick_runs_without_fcntl_and_proc(tmp_path):
    """Lesson 01 --quick, whole, with fcntl unimportable and every /proc file our readers open absent. Its own model
    cache (the decoder and t5 twin it loads, linked from the shared cache) so its soft locks meet no flock."""
    cache = tmp_path / "cache"
    cache.mkdir()
    copy_cache("smollm2-135m-instruct", models.bundled_folder("SmolLM2-135M-Instruct"), cache)
    copy_cache("twin-t5-small", models.twin_folder("t5-small"), cache)
    out = tmp_path / "out"
    env = {**os.environ, "WEEK3_MODEL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SIMULATED_PLATFORM, LESSON, "--quick", "--source", "bundled",
                             "--threads", "2", "--output-dir", str(out)], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "only soft file lock is available" in result.stderr  # filelock's own word that it runs without fcntl
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] is False and report["failures"] == {}
    assert report["environment"]["peak_rss_method"] == "RSS polled every 5 ms (a shorter peak can be missed)"
    assert report["environment"]["cpu"] == (platform.processor() or platform.machine())
    assert report["environment"]["cpu_flags"] == []
    assert {model["source"] for model in report["models"]} == {"bundled", "twin"}
    assert not (out / cli.LOCK_NAME).exists() and not (out / cli.OWNER_NAME).exists()  # released


# ------------------------------------------------------------------------------------ 5. output piped into head


def closed_pipe(monkeypatch) -> IO[str]:
    """This process's stdout becomes a pipe whose reader has gone, as after `| head -3` read its lines."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def test_a_closed_stdout_mid_run_stops_like_ctrl_c_with_a_partial_report(tmp_path, monkeypatch, capsys):
    def section():
        print("a measured line", flush=True)
        return {"never": True}

    stream = closed_pipe(monkeypatch)
    assert exit_code(tiny_main(section), ["--output-dir", str(tmp_path)]) == OutputClosed.exit_code == 141
    stream.close()  # its descriptor now points at the null device, so the buffered rest goes nowhere, quietly
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is True and data["interrupted"] == OutputClosed.reason
    assert data["failures"] == {"1. only": OutputClosed.reason}
    assert one_line_error(capsys.readouterr().err) == (f"{OutputClosed.reason}: the report written so far is marked "
                                                       f"partial: {tmp_path / 'report.json'}")


def test_a_stdout_closed_after_the_final_report_leaves_it_whole(tmp_path, monkeypatch, capsys):
    stream = closed_pipe(monkeypatch)  # nothing flushes until cli.run's last flush, after finish()
    assert exit_code(tiny_main(), ["--output-dir", str(tmp_path)]) == 141
    stream.close()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is False and data["sections"] == {"1. only": {"value": 1}}
    assert capsys.readouterr().err == ""


def test_lesson_piped_into_head_ends_quietly_with_the_report_written(tmp_path):
    """`01_... --quick | head -3`: the reader takes three lines and goes; the lesson exits 141 with one line on
    stderr and its partial report on disk, no BrokenPipeError traceback."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, LESSON, "--quick", "--source", "bundled", "--threads", "1",
                                "--output-dir", str(out)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        head = [process.stdout.readline() for _ in range(3)]
        process.stdout.close()
        stderr = process.stderr.read()
        assert process.wait(timeout=600) == 141, stderr
    finally:
        if process.poll() is None:
            process.kill()
    assert head[0].startswith("01_autotokenizer_automodel  |  device cpu")
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"{OutputClosed.reason}: the report written so far is marked partial: "
                                               f"{out / 'report.json'}")
    data = json.loads((out / "report.json").read_text())
    assert data["partial"] is True and data["interrupted"] == OutputClosed.reason


# ------------------------------------------------------------------------------------ 6. the model cache folder


def test_a_model_cache_that_cannot_be_created_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("x")
    cache = tmp_path / "a-file" / "cache"
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(cache))
    out = tmp_path / "out"
    assert exit_code(tiny_main(), ["--output-dir", str(out)]) == 2
    assert one_line_error(capsys.readouterr().err) == (f"error: model cache {cache} cannot be created or written to "
                                                       "(Not a directory); set WEEK3_MODEL_CACHE to a folder you can "
                                                       "write to")
    assert not out.exists()  # refused before the output folder was even made


def test_source_hub_needs_no_model_cache(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(tmp_path / "a-file" / "cache"))
    assert exit_code(tiny_main(), ["--source", "hub", "--output-dir", str(tmp_path / "out")]) == 0


# ------------------------------------------------------------------------------------ 7. a damaged Hub cache


def test_safetensors_check_reads_the_header_only(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10, 10)}, str(path))
    whole = path.read_bytes()
    assert models.safetensors_problem(path) is None
    path.write_bytes(whole[:-1000])
    assert models.safetensors_problem(path) == (f"truncated or corrupt: {len(whole) - 1000:,} bytes where its header "
                                                f"implies {len(whole):,}")
    path.write_bytes(whole[:20])
    assert models.safetensors_problem(path) == ("truncated or corrupt: 20 bytes, less than its header announces "
                                                "(a cut download?)")
    path.write_bytes(whole[:8] + b"not json" + whole[16:])
    assert models.safetensors_problem(path) == "corrupt: its header is not a safetensors header"
    assert models.safetensors_problem(tmp_path / "gone.safetensors").startswith("unreadable (No such file")


ENCODER_HUB_ID = models.CATALOG["all-MiniLM-L6-v2"].hub_id


@pytest.fixture
def damaged_hub(tmp_path, monkeypatch):
    """A Hub cache in the real layout holding the encoder's checkpoint, its model.safetensors cut to 1,000 bytes."""
    home, source = tmp_path / "hf_home", tmp_path / "cut-download"
    # A copy, never links into the bundled model: the cache's blobs link to these files.
    shutil.copytree(models.bundled_folder("all-MiniLM-L6-v2"), source, ignore=shutil.ignore_patterns("*.safetensors"))
    with open(models.bundled_folder("all-MiniLM-L6-v2") / "model.safetensors", "rb") as whole:
        (source / "model.safetensors").write_bytes(whole.read(1000))
    snapshot = add_to_hub_cache(home / "hub", ENCODER_HUB_ID, source)
    weights = snapshot / "model.safetensors"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(models, "_REPLACED", set())
    models.hub_reachable.cache_clear()
    yield home, weights, snapshot.parents[1]
    models.hub_reachable.cache_clear()


def damage_and_fix(weights: Path, repo: Path) -> tuple[str, str]:
    """What the one line about the cut encoder file says is wrong, and the fix it gives."""
    return (f"{weights} in the Hugging Face cache is truncated or corrupt: 1,000 bytes, less than its header announces "
            "(a cut download?)", f"delete {repo} and download it again, or run with --source bundled")


def damage_line(weights: Path, repo: Path) -> str:
    """The refusal: the file, what is wrong, and the fix."""
    return "; ".join(damage_and_fix(weights, repo))


def test_a_damaged_hub_file_under_source_hub_is_one_line_before_any_work(damaged_hub, tmp_path, capsys):
    _, weights, repo = damaged_hub
    with pytest.raises(UserError) as error:
        models.resolve("encoder", "hub")
    assert str(error.value) == damage_line(weights, repo)
    assert exit_code(tiny_main(), ["--source", "hub", "--output-dir", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys.readouterr().err) == f"error: {damage_line(weights, repo)}"
    assert not (tmp_path / "out").exists()


def test_a_damaged_hub_file_under_source_auto_falls_back_offline_with_one_warning(damaged_hub, tmp_path, capsys):
    _, weights, repo = damaged_hub
    assert exit_code(tiny_main(), ["--output-dir", str(tmp_path / "out")]) == 0  # the check at start warns...
    role, entry, location, source = models.resolve("encoder", "auto")  # ...and the role then loads offline
    assert (role, entry.name, source) == ("encoder", "all-MiniLM-L6-v2", "bundled")
    assert location == str(models.bundled_folder("all-MiniLM-L6-v2"))
    damage, fix = damage_and_fix(weights, repo)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[cache]")]
    assert warnings == [f"[cache] {damage}; using the offline model instead (to repair it: {fix})"]


def test_a_damaged_hub_file_without_offline_models_is_refused_under_auto_too(damaged_hub, monkeypatch):
    _, weights, repo = damaged_hub
    monkeypatch.setattr(models, "offline_models_installed", lambda: False)
    with pytest.raises(UserError) as error:
        models.check_hub_cache("auto")
    assert str(error.value) == damage_line(weights, repo)


def test_lesson_with_a_damaged_hub_file_exits_2_before_the_sections(damaged_hub, tmp_path):
    home, weights, repo = damaged_hub
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, LESSON, "--quick", "--source", "hub", "--output-dir",
                             str(tmp_path / "out")], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == f"error: {damage_line(weights, repo)}"
    assert "=" * 20 not in result.stdout  # no section started
