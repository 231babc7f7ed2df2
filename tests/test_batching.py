"""Tests for common/batching.py on hand-made lengths, where every count can be done by hand."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import torch
from transformers import AutoTokenizer

from common import models
from common.batching import (batch_shapes, batch_work, encoder_forward_bytes, encoder_forward_flops, make_batches,
                             padded_batches, padding_waste)


def test_make_batches_sorted_and_in_order():
    lengths = [5, 1, 4, 2, 3]
    assert make_batches(lengths, 2, sort_by_length=False) == [[0, 1], [2, 3], [4]]
    assert make_batches(lengths, 2, sort_by_length=True) == [[1, 3], [4, 2], [0]]
    assert make_batches([], 4, sort_by_length=True) == []
    with pytest.raises(ValueError):
        make_batches(lengths, 0, sort_by_length=False)


def test_padding_waste_on_a_hand_made_batch():
    batches = [[3, 5], [2]]  # token lengths: 10 real tokens
    dynamic = padding_waste(batches)
    assert (dynamic["real_tokens"], dynamic["padded_slots"]) == (10, 2 * 5 + 1 * 2)
    assert dynamic["waste_pct"] == pytest.approx(100 * 2 / 12)
    padded = padding_waste(batches, pad_to=8)
    assert padded["padded_slots"] == 24 and padded["waste_pct"] == pytest.approx(100 * 14 / 24)
    assert padding_waste([])["waste_pct"] == 0.0


def test_sorting_by_length_wastes_less_padding():
    lengths = [5, 1, 4, 2, 3]
    waste = {sort: padding_waste([[lengths[i] for i in batch] for batch in make_batches(lengths, 2, sort)])
             for sort in (False, True)}
    assert waste[True]["waste_pct"] < waste[False]["waste_pct"]
    assert waste[True]["real_tokens"] == waste[False]["real_tokens"] == sum(lengths)


def test_batch_shapes_dynamic_and_padded():
    lengths = [5, 1, 4, 2, 3]
    batches = make_batches(lengths, 2, sort_by_length=True)  # [[1, 3], [4, 2], [0]] -> longest 2, 4, 5
    assert batch_shapes(lengths, batches) == {(2, 2), (2, 4), (1, 5)}
    assert batch_shapes(lengths, batches, pad_to=8) == {(2, 8), (1, 8)}


def test_encoder_forward_flops_by_hand():
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    projections = 2 * 5 * (4 * 4 * 4 + 2 * 4 * 8)  # 1280
    attention = 2 * 2 * 5 * 5 * 4  # 400
    assert encoder_forward_flops(config, batch_size=3, seq_len=5) == 3 * 2 * (projections + attention)


def test_padded_batches_pad_to_the_cap_or_to_each_batch_longest():
    tokenizer = AutoTokenizer.from_pretrained(models.bundled_folder("all-MiniLM-L6-v2"))
    texts = ["a b c d e f g", "hi", "one two three", "x"]
    encoded = tokenizer(texts, truncation=True, max_length=16)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    groups = make_batches(lengths, 2, sort_by_length=True)  # [[3, 1], [2, 0]]
    dynamic = padded_batches(tokenizer, encoded, groups, None, torch.device("cpu"))
    assert [tuple(b["input_ids"].shape) for b in dynamic] == [(2, max(lengths[i] for i in g)) for g in groups]
    assert [b["attention_mask"].sum().item() for b in dynamic] == [sum(lengths[i] for i in g) for g in groups]
    capped = padded_batches(tokenizer, encoded, groups, 16, torch.device("cpu"))
    assert {tuple(b["input_ids"].shape) for b in capped} == {(2, 16)}


def test_encoder_forward_bytes_by_hand():
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    per_layer = 3 * 5 * (10 * 4 + 2 * 8) + 2 * 3 * 2 * 5 * 5  # 840 activation elements + 300 attention scores
    assert encoder_forward_bytes(config, 3, 5, weight_bytes=1000, element_bytes=2) == 1000 + 2 * 2 * per_layer


def test_batch_work_sums_flops_over_batches_and_counts_padding():
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    lengths, groups = [3, 5, 2], [[0, 1], [2]]
    batches = [{"input_ids": torch.zeros(2, 5)}, {"input_ids": torch.zeros(1, 2)}]  # dynamic padding
    work = batch_work(config, batches, lengths, groups, None, weight_bytes=100)
    assert work["flops"] == encoder_forward_flops(config, 2, 5) + encoder_forward_flops(config, 1, 2)
    # useful work: each text as if alone, so the 3-token text's padding to 5 is not counted
    assert work["useful_flops"] == sum(encoder_forward_flops(config, 1, n) for n in lengths) < work["flops"]
    assert work["bytes"] == (encoder_forward_bytes(config, 2, 5, 100, 4) + encoder_forward_bytes(config, 1, 2, 100, 4))
    assert (work["real_tokens"], work["padded_slots"]) == (10, 12)
