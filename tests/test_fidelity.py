"""Fidelity measures (row cosine, rank correlation of pairwise similarities) and the texts they are judged on."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from common import fidelity, texts


def test_cosine_fidelity_reports_mean_and_worst_row():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidate = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # scale is ignored; the second row is 45 degrees off
    result = fidelity.cosine_fidelity(reference, candidate)
    assert result["cosine_min"] == pytest.approx(math.sqrt(0.5))
    assert result["cosine_mean"] == pytest.approx((1 + math.sqrt(0.5)) / 2)


def test_decoder_fidelity_counts_tokens_before_the_first_divergence_then_agreement():
    shifted = fidelity.decoder_fidelity([5, 6, 7, 8, 9, 10], [5, 6, 1, 7, 8, 9])  # one extra token shifts the rest
    assert shifted == {"tokens_before_divergence": 2, "token_agreement": pytest.approx(2 / 6)}
    assert list(shifted) == ["tokens_before_divergence", "token_agreement"]  # divergence first, as tables show it
    assert fidelity.decoder_fidelity([1, 2, 3], [1, 2, 3]) == {"tokens_before_divergence": 3, "token_agreement": 1.0}
    assert fidelity.first_divergence([1, 2, 3], [1, 2]) == 2  # a shorter candidate diverges where it stops
    assert fidelity.first_divergence([1, 2, 3, 4], [9, 2, 3, 4]) == 0
    assert fidelity.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75  # later positions can agree again
    assert fidelity.token_agreement([1, 2, 3, 4], [1, 2]) == 0.5  # missing tokens count as disagreement
    with pytest.raises(ValueError):
        fidelity.token_agreement([], [1])


def test_average_ranks_share_tied_positions():
    np.testing.assert_array_equal(fidelity.average_ranks(np.array([10.0, 20, 20, 30, 5])), [2, 3.5, 3.5, 5, 1])


def test_spearman_on_known_data():
    assert fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)  # monotone, not linear
    assert fidelity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # y's ranks with a tie are [1, 2, 3.5, 5, 3.5]: by hand, r = 8 / sqrt(10 * 9.5).
    assert fidelity.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    with pytest.raises(ValueError):
        fidelity.spearman([1, 2, 3], [1, 2])


def test_spearman_agrees_with_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)
    y = x + rng.integers(0, 4, 200)
    assert fidelity.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_similarity_spearman_sees_rankings_not_rows():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(20, 16, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    # A rotation changes every vector but no pairwise similarity: the task-level check must not mind.
    rotated = reference @ rotation
    assert fidelity.cosine_fidelity(reference, rotated)["cosine_mean"] < 0.9
    assert fidelity.similarity_spearman(reference, rotated) == pytest.approx(1.0)
    noisy = reference + 0.5 * torch.randn(20, 16, generator=generator)
    assert 0.5 < fidelity.similarity_spearman(reference, noisy) < 0.99
    assert len(fidelity.pairwise_similarities(reference)) == 20 * 19 // 2
    assert set(fidelity.embedding_fidelity(reference, noisy)) == {"cosine_mean", "cosine_min", "similarity_spearman"}


def test_fidelity_texts_are_many_and_varied():
    corpus = texts.FIDELITY_TEXTS
    assert len(corpus) >= 64 and len(set(corpus)) == len(corpus)
    words = [len(text.split()) for text in corpus]
    assert min(words) <= 3 and max(words) >= 100
    assert sum(any(letter in text for letter in "çğışöüİ") for text in corpus) >= 5  # Turkish
    assert any("def " in text for text in corpus) and any("SELECT" in text for text in corpus)  # code
    assert any(ord(character) > 0x1F000 for text in corpus for character in text)  # emoji
    assert sum(any(character.isdigit() for character in text) for text in corpus) >= 10


def test_realistic_corpus_is_deterministic_real_sentences():
    corpus = texts.realistic_corpus(50, seed=3)
    assert corpus == texts.realistic_corpus(50, seed=3) != texts.realistic_corpus(50, seed=4)
    words = [len(text.split()) for text in corpus]
    assert min(words) >= 4 and max(words) > 60
    known = " ".join(texts.SENTENCES + texts.FIDELITY_TEXTS)
    for text in corpus[:10]:  # whole sentences from real texts, not word salad
        assert all(sentence in known for sentence in re.split(r"(?<=[.!?])\s+", text))
