"""Unit tests of the custom pipelines (common/pipelines.py and 01's own), on the bundled encoder and the t5-small twin."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import pipeline

from common import models, pipelines
from tests.conftest import ROOT, load_script

RELATED = ("The cat slept on the warm windowsill all afternoon.", "A kitten napped in the sunshine by the window.")
UNRELATED = ("The cat slept on the warm windowsill all afternoon.", "Heavy snowfall made the railway service run late.")


@pytest.fixture(scope="module")
def encoder():
    return models.load_model("encoder", source="bundled", verbose=False)


@pytest.fixture(scope="module")
def similarity(encoder):
    return load_script("01_autotokenizer_automodel").SentenceSimilarityPipeline(model=encoder.model,
                                                                               tokenizer=encoder.tokenizer)


@pytest.fixture(scope="module")
def seq2seq():
    return models.load_model("seq2seq", source="bundled", verbose=False)


@pytest.fixture(scope="module")
def classifier(encoder):
    return pipeline(task=pipelines.EMBEDDING_CLASSIFICATION, model=encoder.model, tokenizer=encoder.tokenizer,
                    examples=models.SENTIMENT_EXAMPLES)


def pair(a: str, b: str) -> dict[str, str]:
    return {"text": a, "text_pair": b}


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pipelines.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_similarity_orders_related_above_unrelated(similarity):
    related = similarity(pair(*RELATED))["score"]
    unrelated = similarity(pair(*UNRELATED))["score"]
    assert related > unrelated + 0.2
    assert similarity(pair(RELATED[0], RELATED[0]))["score"] == pytest.approx(1.0, abs=1e-5)
    assert similarity(pair(*RELATED))["score"] == pytest.approx(similarity(pair(*reversed(RELATED)))["score"], abs=1e-6)


def test_similarity_stages_split_the_work(similarity, encoder):
    model_inputs = similarity.preprocess(pair(*RELATED))
    assert model_inputs["input_ids"].shape[0] == 2  # both texts tokenised together, padded to one length
    outputs = similarity.forward(model_inputs)
    assert outputs["embeddings"].shape == (2, 384)
    score = similarity.postprocess(outputs)["score"]
    reference = pipelines.embed(encoder.model, encoder.tokenizer, list(RELATED))
    assert score == pytest.approx(float(reference[0] @ reference[1]), abs=1e-5)
    with pytest.raises(ValueError, match="text_pair"):
        similarity.preprocess({"text": "only one"})


def test_text_to_text_plumbing_on_the_twin(seq2seq):
    assert not seq2seq.info.meaningful  # random weights: only shapes and counts are checked, never the text
    text_to_text = pipeline(task=pipelines.TEXT_TO_TEXT, model=seq2seq.model, tokenizer=seq2seq.tokenizer)
    plain = text_to_text.preprocess("tokenizers make ids")
    prefixed = text_to_text.preprocess("tokenizers make ids", prefix="summarize: ")
    assert prefixed["input_ids"].shape[1] > plain["input_ids"].shape[1]
    capped = text_to_text.preprocess("word " * 200, max_input_tokens=8)
    assert capped["input_ids"].shape == (1, 8)
    result = text_to_text("tokenizers make ids", prefix="summarize: ", max_new_tokens=5)
    assert result["output_tokens"] == 6  # the decoder start token + 5 new tokens (the twin has no EOS to stop at)
    assert isinstance(result["generated_text"], str)


def test_embedding_classification_on_clear_sentences(classifier):
    assert classifier("I absolutely loved it, a wonderful day.")["label"] == "POSITIVE"
    assert classifier("This was dreadful and I regret buying it.")["label"] == "NEGATIVE"
    ranked = classifier("I absolutely loved it, a wonderful day.", top_k=2)
    assert [r["label"] for r in ranked] == ["POSITIVE", "NEGATIVE"]
    assert sum(r["score"] for r in ranked) == pytest.approx(1.0, abs=1e-5)


def test_embedding_classification_batched_equals_single(classifier):
    sentences = ["Superb, I am delighted.", "Awful, it broke at once.", "Lovely staff and tasty food.",
                 "Dull and far too long."]
    single = [classifier(s)["label"] for s in sentences]
    batched = [r["label"] for r in classifier(sentences, batch_size=4)]
    assert single == batched == ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE"]


def test_embedding_classification_needs_examples(encoder):
    with pytest.raises(ValueError, match="example"):
        pipeline(task=pipelines.EMBEDDING_CLASSIFICATION, model=encoder.model, tokenizer=encoder.tokenizer,
                 examples={"POSITIVE": ["good"], "NEGATIVE": []})


PIPELINE_CALL = re.compile(r"\bpipeline\((.*?)\)(?=[(\s,]|$)", re.S)


def test_a_pipeline_given_a_loaded_model_is_told_its_device(monkeypatch):
    """transformers 5 moves a loaded model to GPU 0 when pipeline() gets no device: on a GPU machine a "cpu" run
    would silently time the GPU. Seen here by pretending a GPU exists: the classifier must stay where it was loaded."""
    monkeypatch.setattr("transformers.pipelines.base.is_torch_cuda_available", lambda: True)
    classifier, _ = models.load_classifier(source="bundled", device="cpu", verbose=False)
    assert classifier.device == torch.device("cpu") and classifier.model.device == torch.device("cpu")
    for lesson in sorted(ROOT.glob("0*.py")):  # and every lesson passes device= wherever it hands over a model object
        for call in PIPELINE_CALL.findall(lesson.read_text()):
            if re.search(r"model=(?!where\.path)\w", call):
                assert "device=" in call, f"{lesson.name}: pipeline({call}) has no device="


def test_embed_batches_shortest_first_but_returns_input_order(encoder):
    texts = ["A much longer sentence about tokenizers, padding and the cost of attention over many positions.",
             "Short.", "A middle-sized sentence here.", "Hi"]
    batched = pipelines.embed(encoder.model, encoder.tokenizer, texts, batch_size=2)
    one_by_one = torch.cat([pipelines.embed(encoder.model, encoder.tokenizer, [text]) for text in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)  # padding never changes a masked mean
    assert batched.shape == (4, encoder.model.config.hidden_size)
