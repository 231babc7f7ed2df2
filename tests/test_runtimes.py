"""Peer runtimes on the bundled MiniLM: the ONNX export and ONNX Runtime int8 against PyTorch, sentence-transformers."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from common import models, runtimes, texts
from common.fidelity import cosine_fidelity

pytestmark = pytest.mark.skipif(runtimes.onnx_unavailable() is not None, reason=str(runtimes.onnx_unavailable()))
TEXTS = texts.FIDELITY_TEXTS[::2]  # half the fidelity set keeps the spread (2 to 151 words, two batches) at half the time


@pytest.fixture(scope="module")
def minilm():
    folder = models.bundled_folder("all-MiniLM-L6-v2")
    return folder, AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(minilm):
    _, model, tokenizer = minilm
    return runtimes.torch_embedder(model, tokenizer)(TEXTS)


@pytest.fixture(scope="module")
def exported(minilm, tmp_path_factory):
    _, model, tokenizer = minilm
    return runtimes.export_onnx(model, tokenizer, tmp_path_factory.mktemp("onnx"))


def test_sorted_batches_return_rows_in_input_order_unaffected_by_padding(minilm, reference):
    _, model, tokenizer = minilm
    one_by_one = runtimes.torch_embedder(model, tokenizer, batch_size=1)(TEXTS[:12])
    assert cosine_fidelity(one_by_one, reference[:12])["cosine_min"] > 0.99999
    torch.testing.assert_close(reference.norm(dim=-1), torch.ones(len(reference)))


def test_onnx_export_matches_pytorch_on_mixed_lengths(minilm, reference, exported):
    _, _, tokenizer = minilm
    onnx_fp32 = runtimes.onnx_embedder(exported, tokenizer)(TEXTS)
    assert cosine_fidelity(reference, onnx_fp32)["cosine_min"] >= 0.9999


def test_export_leaves_the_pytorch_model_as_it_was(minilm, reference, exported):
    _, model, tokenizer = minilm
    assert not model.training  # the exporter restores modes recursively; dropout must stay off
    after = runtimes.torch_embedder(model, tokenizer)(TEXTS)
    torch.testing.assert_close(after, reference)


def test_export_is_reused_while_the_model_is_the_same(minilm, exported):
    _, model, tokenizer = minilm
    written = exported.stat().st_mtime_ns
    assert runtimes.export_onnx(model, tokenizer, exported.parent) == exported
    assert exported.stat().st_mtime_ns == written


def test_onnx_runtime_int8_stays_close_and_is_smaller(minilm, reference, exported):
    _, _, tokenizer = minilm
    int8 = runtimes.quantize_onnx_int8(exported, reduce_range=False)
    assert int8.stat().st_size < exported.stat().st_size / 3
    fidelity = cosine_fidelity(reference, runtimes.onnx_embedder(int8, tokenizer)(TEXTS))
    assert fidelity["cosine_min"] >= 0.95
    assert fidelity["cosine_mean"] < 0.99999  # really int8, not the fp32 file again


@pytest.mark.skipif(runtimes.sentence_transformers_unavailable() is not None, reason="sentence-transformers missing")
def test_sentence_transformers_encode_matches_our_mean_pooling(minilm, reference):
    folder, _, _ = minilm
    encoded = runtimes.sentence_transformers_embedder(folder)(TEXTS)
    assert cosine_fidelity(reference, encoded)["cosine_min"] >= 0.9999


def test_a_missing_runtime_is_a_printable_reason(monkeypatch):
    real_import = importlib.import_module

    def without_onnxruntime(name, *args):
        if name.startswith("onnxruntime"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    reason = runtimes.onnx_unavailable()
    assert "onnxruntime" in reason and "requirements.txt" in reason


def test_peer_problems_refuse_a_folder_without_pooling_config(tmp_path, minilm):
    folder, _, _ = minilm
    without = runtimes.peer_problems(tmp_path, torch.device("cpu"))
    if runtimes.sentence_transformers_unavailable() is None:
        assert "no modules.json" in without[runtimes.SENTENCE_TRANSFORMERS]
        assert runtimes.peer_problems(folder, torch.device("cpu"))[runtimes.SENTENCE_TRANSFORMERS] is None
    assert without[runtimes.ONNX_FP32] is None and set(without) == set(runtimes.PEERS)
    on_gpu = runtimes.peer_problems(folder, torch.device("cuda"))  # ONNX Runtime here is the CPU build
    if runtimes.onnx_unavailable() is None:
        assert "CPU only" in on_gpu[runtimes.ONNX_FP32] and on_gpu[runtimes.ONNX_INT8] == on_gpu[runtimes.ONNX_FP32]


def test_peer_builders_build_nothing_until_called(tmp_path, minilm):
    folder, model, tokenizer = minilm
    builders = runtimes.peer_builders(folder, model, tokenizer, torch.device("cpu"), tmp_path / "onnx", True)
    assert list(builders) == list(runtimes.PEERS)
    assert not (tmp_path / "onnx").exists()  # no export happens before a builder is called


def test_torch_embedder_pools_with_the_mask_left_where_the_hidden_states_come_back(minilm):
    """On a GPU the forward returns CPU hidden states: the pooling mask must not have been moved to the GPU with the
    inputs (BatchEncoding.to moves in place). A model whose weights are on `meta` stands in for the GPU."""
    _, _, tokenizer = minilm
    seen = []

    class OnMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))

        def forward(self, **inputs):
            seen.append({value.device.type for value in inputs.values()})
            hidden = torch.ones(*inputs["input_ids"].shape, 4)  # what `.cpu()` of the GPU's output would be
            return type("Output", (), {"last_hidden_state": hidden})()

    embedded = runtimes.torch_embedder(OnMeta(), tokenizer)(["a short text", "a somewhat longer text here"])
    assert seen == [{"meta"}] and embedded.shape == (2, 4)  # inputs went to the model's device, pooling stayed on CPU


def test_fused_int8_peer_fuses_attention_and_stays_close(tmp_path, minilm, reference):
    folder, model, tokenizer = minilm
    embed = runtimes.peer_builders(folder, model, tokenizer, torch.device("cpu"), tmp_path, True)[
        runtimes.ONNX_FUSED_INT8]()
    fused = runtimes.fused_operators(tmp_path / "encoder.eager.fused.onnx")
    assert fused["Attention"] == fused["BiasGelu"] == model.config.num_hidden_layers  # one per layer
    assert fused["SkipLayerNormalization"] == 2 * model.config.num_hidden_layers
    assert runtimes.fused_operators(tmp_path / "encoder.eager.fused.int8-reduce-range.onnx")["QAttention"] == 6
    fidelity = cosine_fidelity(reference, embed(TEXTS))
    assert 0.95 <= fidelity["cosine_min"] and fidelity["cosine_mean"] < 0.99999  # int8, and close


@pytest.mark.parametrize("peer", [runtimes.ONNX_FUSED_INT8, runtimes.SENTENCE_TRANSFORMERS])
def test_peer_snippet_runs_as_pasted_and_gives_the_peers_embeddings(tmp_path, minilm, peer):
    folder, model, tokenizer = minilm
    if peer == runtimes.SENTENCE_TRANSFORMERS and runtimes.sentence_transformers_unavailable():
        pytest.skip("sentence-transformers missing")
    sample = TEXTS[:5]
    snippet = runtimes.peer_snippet(peer, str(folder), sample, reduce_range=True, batch_size=2, max_length=64)
    assert snippet.splitlines()[-1].startswith("embeddings = ") and "common." not in snippet
    (tmp_path / "snippet.py").write_text(f"import torch\n{snippet}\ntorch.save(embeddings, 'out.pt')")
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = runtimes.peer_builders(folder, model, tokenizer, torch.device("cpu"), tmp_path / "ours", True,
                                  batch_size=2, max_length=64)[peer]()(sample)
    assert cosine_fidelity(ours, torch.load(tmp_path / "out.pt").float())["cosine_min"] > 0.9999
