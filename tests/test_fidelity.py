"""Fidelity measures (row cosine, rank correlation of pairwise similarities) and the texts they are judged on."""
from __future__ import annotations

import math

import pytest
import torch

from common import fidelity, texts


def test_cosine_fidelity_reports_mean_and_worst_row():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidate = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # scale is ignored; the second row is 45 degrees off
    result = fidelity.cosine_fidelity(reference, candidate)
    assert result["cosine_min"] == pytest.approx(math.sqrt(0.5))
    assert result["cosine_mean"] == pytest.approx((1 + math.sqrt(0.5)) / 2)


def test_fidelity_texts_are_many_and_varied():
    corpus = texts.FIDELITY_TEXTS
    assert len(corpus) >= 64 and len(set(corpus)) == len(corpus)
    words = [len(text.split()) for text in corpus]
    assert min(words) <= 3 and max(words) >= 100
    assert sum(any(letter in text for letter in "çğışöüİ") for text in corpus) >= 5  # Turkish
    assert any("def " in text for text in corpus) and any("SELECT" in text for text in corpus)  # code
    assert any(ord(character) > 0x1F000 for text in corpus for character in text)  # emoji
    assert sum(any(character.isdigit() for character in text) for text in corpus) >= 10


