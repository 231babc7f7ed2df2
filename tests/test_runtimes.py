"""Peer-runtime bookkeeping on the bundled MiniLM: the shared batching loop, the ONNX export and its int8 against
PyTorch, sentence-transformers' pooling, and why a runtime cannot run. (The snippets: test_04_contest.py.)"""
from __future__ import annotations

import importlib
import time

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


def torch_embed(model, tokenizer, texts, batch_size=32):
    """PyTorch's forward in the shared loop, as 04 builds it."""
    def forward(batch):
        with torch.inference_mode():
            return model(**batch).last_hidden_state
    return runtimes.embed_sorted(forward, tokenizer, texts, batch_size)


@pytest.fixture(scope="module")
def reference(minilm):
    _, model, tokenizer = minilm
    return torch_embed(model, tokenizer, TEXTS)


def test_sorted_batches_return_rows_in_input_order_unaffected_by_padding(minilm, reference):
    _, model, tokenizer = minilm
    one_by_one = torch_embed(model, tokenizer, TEXTS[:12], batch_size=1)
    assert cosine_fidelity(one_by_one, reference[:12])["cosine_min"] > 0.99999
    torch.testing.assert_close(reference.norm(dim=-1), torch.ones(len(reference)))


def onnx_embed(path, tokenizer, texts):
    """ONNX Runtime's forward in the shared loop, as 04 builds it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    return runtimes.embed_sorted(lambda batch: torch.from_numpy(session.run(
        ["last_hidden_state"], {name: batch[name].numpy() for name in names})[0]), tokenizer, texts)


@pytest.fixture(scope="module")
def exported(minilm, tmp_path_factory):
    _, model, tokenizer = minilm
    return runtimes.export_onnx(model, tokenizer, tmp_path_factory.mktemp("onnx"))


def test_onnx_export_matches_pytorch_on_mixed_lengths(minilm, reference, exported):
    _, _, tokenizer = minilm
    onnx_fp32 = onnx_embed(exported, tokenizer, TEXTS)
    assert cosine_fidelity(reference, onnx_fp32)["cosine_min"] >= 0.9999


def test_export_is_reused_while_the_model_is_the_same(minilm, exported):
    _, model, tokenizer = minilm
    written = exported.stat().st_mtime_ns
    assert runtimes.export_onnx(model, tokenizer, exported.parent) == exported
    assert exported.stat().st_mtime_ns == written


def test_onnx_runtime_int8_stays_close_and_is_smaller(minilm, reference, exported):
    _, _, tokenizer = minilm
    int8 = runtimes.quantize_onnx_int8(exported, reduce_range=False)
    assert int8.stat().st_size < exported.stat().st_size / 3
    fidelity = cosine_fidelity(reference, onnx_embed(int8, tokenizer, TEXTS))
    assert fidelity["cosine_min"] >= 0.95
    assert fidelity["cosine_mean"] < 0.99999  # really int8, not the fp32 file again


@pytest.mark.skipif(runtimes.sentence_transformers_unavailable() is not None, reason="sentence-transformers missing")
def test_sentence_transformers_encode_matches_our_mean_pooling(minilm, reference):
    from sentence_transformers import SentenceTransformer

    folder, _, _ = minilm
    model = SentenceTransformer(str(folder))
    model.max_seq_length = 128
    encoded = model.encode(TEXTS, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
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
        assert "on the CPU here" in on_gpu[runtimes.ONNX_FP32]
        assert on_gpu[runtimes.ONNX_INT8] == on_gpu[runtimes.ONNX_FP32] == on_gpu[runtimes.OPENVINO_FP32]


def test_outside_forward_share_is_the_time_the_forward_does_not_take(minilm):
    _, _, tokenizer = minilm

    def slow_forward(batch):  # 50 ms a batch: far more than tokenising and pooling two short texts take
        time.sleep(0.05)
        return torch.ones(*batch["input_ids"].shape, 4)

    share = runtimes.outside_forward_share(slow_forward, tokenizer, ["a text", "another text"] * 2, 2, 32)
    assert 0 < share < 0.5
