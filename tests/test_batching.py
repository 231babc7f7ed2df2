"""Tests for common/batching.py on hand-made lengths, where every count can be done by hand."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.batching import encoder_forward_bytes, encoder_forward_flops, make_batches


def test_make_batches_sorted_and_in_order():
    lengths = [5, 1, 4, 2, 3]
    assert make_batches(lengths, 2, sort_by_length=False) == [[0, 1], [2, 3], [4]]
    assert make_batches(lengths, 2, sort_by_length=True) == [[1, 3], [4, 2], [0]]
    assert make_batches([], 4, sort_by_length=True) == []
    with pytest.raises(ValueError):
        make_batches(lengths, 0, sort_by_length=False)


def test_encoder_forward_flops_by_hand():
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    projections = 2 * 5 * (4 * 4 * 4 + 2 * 4 * 8)  # 1280
    attention = 2 * 2 * 5 * 5 * 4  # 400
    assert encoder_forward_flops(config, batch_size=3, seq_len=5) == 3 * 2 * (projections + attention)


def test_encoder_forward_bytes_by_hand():
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    per_layer = 3 * 5 * (10 * 4 + 2 * 8) + 2 * 3 * 2 * 5 * 5  # 840 activation elements + 300 attention scores
    assert encoder_forward_bytes(config, 3, 5, weight_bytes=1000, element_bytes=2) == 1000 + 2 * 2 * per_layer


