"""The Hub code path under test, offline: a Hugging Face cache in the real layout (hub/models--org--name/ with blobs/,
refs/main and snapshots/<rev>/) holding the catalog's six Hub ids, built from the bundled MiniLM and the twins by
symlinks (nothing is copied), with an SST-2 style classifier config on the DistilBERT twin and a random head."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from common import models
from common.errors import UserError
from tests.conftest import ROOT

# catalog name -> the folder its Hub id is filled from
HUB_SOURCES = {
    "all-MiniLM-L6-v2": lambda: models.bundled_folder("all-MiniLM-L6-v2"),
    "distilbert-sst2": lambda: models.twin_folder("distilbert-base-uncased"),
    "gpt2": lambda: models.twin_folder("gpt2"),
    "t5-small": lambda: models.twin_folder("t5-small"),
    "bert-base-uncased": lambda: models.twin_folder("bert-base-uncased"),
    "distilbert-base-uncased": lambda: models.twin_folder("distilbert-base-uncased"),
}
SST2_LABELS = {"id2label": {"0": "NEGATIVE", "1": "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}


def hub_repo(hub_cache: Path, hub_id: str) -> Path:
    """The cache folder of one Hub model, as huggingface_hub names it."""
    return hub_cache / ("models--" + hub_id.replace("/", "--"))


def add_to_hub_cache(hub_cache: Path, hub_id: str, source: Path, config: dict | None = None) -> Path:
    """Put a folder's files into the cache as the Hub does: blobs, a snapshot of relative links, refs/main."""
    repo = hub_repo(hub_cache, hub_id)
    revision = hashlib.sha1(hub_id.encode()).hexdigest()  # any 40-hex commit id will do
    snapshot = repo / "snapshots" / revision
    for file in sorted(path for path in source.rglob("*") if path.is_file() and path.name != "manifest.json"):
        relative = file.relative_to(source)
        if config is not None and relative == Path("config.json"):
            continue
        blob = repo / "blobs" / hashlib.sha256(str(relative).encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.symlink_to(file.resolve())
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if config is not None:
        (snapshot / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def build_hub_cache(home: Path) -> dict[str, Path]:
    """Fill HF_HOME=home with the six Hub ids; returns each catalog name's snapshot folder."""
    snapshots = {}
    for name, folder in HUB_SOURCES.items():
        source = folder()
        config = None
        if name == "distilbert-sst2":  # the twin's weights plus a classification head, initialised at load
            config = json.loads((source / "config.json").read_text(encoding="utf-8"))
            config.update(architectures=["DistilBertForSequenceClassification"], **SST2_LABELS)
        snapshots[name] = add_to_hub_cache(home / "hub", models.CATALOG[name].hub_id, source, config)
    return snapshots


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    return home, build_hub_cache(home)


@pytest.fixture
def hub_cache(hub_home, monkeypatch):
    """This process reads the built cache (huggingface_hub fixed its cache path at import); no probe memo."""
    home, snapshots = hub_home
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.hub_reachable.cache_clear()
    yield snapshots
    models.hub_reachable.cache_clear()


@pytest.fixture
def connections(monkeypatch):
    """Every TCP connect attempt, refused and recorded (the Hub probe runs on a thread, so raising would be lost)."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[-1] if args else kwargs)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_cache_has_the_real_layout_and_huggingface_hub_reads_it(hub_cache):
    for name, snapshot in hub_cache.items():
        hub_id = models.CATALOG[name].hub_id
        repo = hub_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), hub_id)
        assert (repo / "refs" / "main").read_text() == snapshot.name
        assert huggingface_hub.snapshot_download(hub_id, local_files_only=True) == str(snapshot)
        weights = snapshot / "model.safetensors"
        assert weights.is_symlink() and Path(os.readlink(weights)).parts[:2] == ("..", "..")  # -> ../../blobs/<hash>
        assert weights.stat().st_size > 10_000_000
    config = json.loads((hub_cache["distilbert-sst2"] / "config.json").read_text())
    assert config["id2label"] == SST2_LABELS["id2label"]


def test_auto_picks_every_cached_hub_id_without_a_network_probe(hub_cache, connections):
    for role, (hub_name, _) in models.ROLES.items():
        found_role, entry, location, source = models.resolve(role, "auto")
        assert (found_role, entry.name, source) == (role, hub_name, "hub")
        assert location == str(hub_cache[hub_name])
    where = models.checkpoint("classifier", "auto")  # reads the cached config and checks the head, still offline
    assert (where.source, where.origin, where.kind) == ("hub", models.CATALOG["distilbert-sst2"].hub_id, "classifier")
    assert connections == []


def test_a_cached_config_without_weights_is_not_a_cached_model(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    add_to_hub_cache(tmp_path, "org/half-downloaded", config_only)
    assert huggingface_hub.try_to_load_from_cache("org/half-downloaded", "config.json") is not None
    assert models.hub_cached("org/half-downloaded") is False


class Blackhole:
    """A loopback TCP server that accepts connections and never answers: a Hub that hangs. Counts connections."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for connection in self.accepted:
            connection.close()


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.mark.parametrize("network", ["closed port", "blackhole"])
def test_load_classifier_with_a_filled_cache_decides_fast_when_the_hub_is_unreachable(hub_cache, monkeypatch, network):
    """HF_HUB_OFFLINE unset and the Hub endpoint dead: the cached checkpoint is chosen without one connection
    attempt to the endpoint (so no network wait, whatever the machine's speed), then loads from the cache."""
    blackhole = Blackhole() if network == "blackhole" else None
    port = blackhole.port if blackhole else closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[1] == port:
            attempts.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    decided: list[models.Checkpoint] = []
    real_checkpoint = models.checkpoint

    def recorded_checkpoint(*args: Any, **kwargs: Any) -> models.Checkpoint:
        decided.append(real_checkpoint(*args, **kwargs))
        return decided[-1]

    monkeypatch.setattr(models, "checkpoint", recorded_checkpoint)
    loaded: list = []
    # On a thread: waiting on the blackhole would hang the test for many minutes instead of failing it.
    worker = threading.Thread(target=lambda: loaded.append(models.load_classifier(source="auto", verbose=False)),
                              daemon=True)
    worker.start()
    worker.join(60)
    if blackhole:
        blackhole.close()  # resets any connection, so a hung worker ends
    assert not worker.is_alive() and loaded, "load_classifier waited on the unreachable Hub"
    assert attempts == []
    (where,) = decided
    assert where.path == str(hub_cache["distilbert-sst2"])
    assert blackhole is None or blackhole.accepted == []
    classifier, info = loaded[0]
    assert (info.source, info.role, info.name) == ("hub", "classifier", "distilbert-sst2")
    assert {result["label"] for result in classifier(["great", "awful"])} <= {"POSITIVE", "NEGATIVE"}


def test_hub_source_without_cache_or_network_is_one_clear_line(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="org/not-cached is not in the local Hugging Face cache and the Hub "
                                               "cannot be reached"):
        models.hub_location("org/not-cached")


# The lessons, each run with --quick --source hub against the cache in its own process, all four at once.
LESSONS = ["01_autotokenizer_automodel", "02_gpt_bert_t5_comparison", "03_cpu_gpu_optimization",
           "04_performance_measurement"]


@pytest.fixture(scope="module")
def hub_runs(hub_home, tmp_path_factory):
    """Start every lesson at once, offline, from the Hub cache, one torch thread each so they share the cores.

    All four, because each takes a Hub path of its own (01 the SST-2 classifier by hand, 02 its default Hub models,
    03's quantization section and 04 GPT-2 as the decoder). Together a few CPU-minutes on two cores."""
    home, _ = hub_home
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    runs = {}
    for stem in LESSONS:
        out = tmp_path_factory.mktemp(f"hub-{stem[:2]}")
        only = ["--only", "quantization"] if stem.startswith("03") else []  # the section that loads GPT-2
        process = subprocess.Popen([sys.executable, f"{stem}.py", "--quick", "--source", "hub", "--threads", "1",
                                    "--output-dir", str(out), *only], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        runs[stem] = (process, out)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("stem", LESSONS)
def test_lesson_runs_with_every_model_from_the_hub(hub_runs, stem):
    process, out = hub_runs[stem]
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["models"], "the lesson recorded no model"
    assert {model["source"] for model in report["models"]} == {"hub"}
    lines = [line for line in output.splitlines() if line.startswith("[model]")]
    assert lines and all(" source=hub |" in line or line.endswith(" source=hub") for line in lines)  # or wrapped
