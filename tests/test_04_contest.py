"""04 section 7: each kind of winner's snippet (PyTorch, ONNX Runtime, OpenVINO, sentence-transformers) runs as
pasted, uses only public attributes, and returns the L2-normalised embeddings the lesson's own candidate gives."""
from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
import torch

from common import models, runtimes, texts
from common.fidelity import cosine_fidelity
from conftest import load_script

script = load_script("04_performance_measurement")
SAMPLE = [texts.SENTENCES[0], texts.FIDELITY_TEXTS[63], "short", texts.SENTENCES[7]]  # mixed lengths, Turkish too
BATCH, MAX_LENGTH = 2, 32  # two batches of different padded lengths: the sort and the pooling both matter
NEEDS = {runtimes.PYTORCH_FP32: None, runtimes.PYTORCH_INT8: None, runtimes.ONNX_FP32: runtimes.onnx_unavailable(),
         runtimes.ONNX_INT8: runtimes.onnx_unavailable(),
         runtimes.OPENVINO_FP32: runtimes.peer_problems(".", torch.device("cpu"))[runtimes.OPENVINO_FP32],
         runtimes.OPENVINO_INT8: runtimes.peer_problems(".", torch.device("cpu"))[runtimes.OPENVINO_INT8],
         runtimes.SENTENCE_TRANSFORMERS: runtimes.sentence_transformers_unavailable()}


@pytest.fixture(scope="module")
def encoder():
    return models.checkpoint("encoder", "bundled"), models.load_model("encoder", source="bundled", device="cpu")


def private_attributes(code: str) -> list[str]:
    """Attributes a snippet reads that start with an underscore (dunders aside): internals, not API."""
    return [node.attr for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Attribute)
            and node.attr.startswith("_") and not node.attr.endswith("__")]


def test_the_public_api_check_sees_a_private_read():
    assert private_attributes("w = self._packed_params._packed_params\nx.__class__") == ["_packed_params"] * 2


@pytest.mark.parametrize("kind", list(NEEDS))
def test_snippet_runs_as_pasted_and_matches_the_lessons_own_candidate(kind, encoder, tmp_path, monkeypatch):
    if NEEDS[kind]:
        pytest.skip(NEEDS[kind])
    where, loaded = encoder
    calibration = texts.SENTENCES[:4]  # NNCF's calibration: the lesson's and the snippet's, the same texts
    code = runtimes.snippet(kind, str(where.path), SAMPLE, BATCH, MAX_LENGTH, torch.get_num_threads(),
                            reduce_range=True)
    assert private_attributes(code) == [] and "common" not in code and "class DynamicLinear" not in code
    assert code.splitlines()[-1].startswith("embeddings = ")
    (tmp_path / "calibration.txt").write_text("\n".join(calibration) + "\n")
    monkeypatch.chdir(tmp_path)  # the snippet writes encoder.onnx where it runs
    pasted: dict = {}
    exec(compile(code, "snippet.py", "exec"), pasted)
    theirs = pasted["embeddings"].float()
    torch.testing.assert_close(theirs.norm(dim=-1), torch.ones(len(SAMPLE)))

    ctx = SimpleNamespace(device=torch.device("cpu"), out_dir=tmp_path / "lesson")
    monkeypatch.setattr(script, "choose_activation_range", lambda: SimpleNamespace(reduce_range=True))
    monkeypatch.setattr(script, "SHIP_BATCH", BATCH)
    ours = script.contestants(ctx, where, loaded, calibration, MAX_LENGTH, {})[kind]()(SAMPLE)
    assert cosine_fidelity(ours, theirs)["cosine_min"] > 0.9999


def test_the_lesson_writes_the_peers_own_calls():
    source = (script.__file__ and open(script.__file__, encoding="utf-8").read())
    for call in ("SentenceTransformer(", "InferenceSession(", "convert_model(", "compile_model(", "quantize_dynamic(",
                 "nncf.quantize(", "PerformanceMeter("):
        assert call in source, call
