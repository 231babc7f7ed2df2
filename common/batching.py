"""Batching arithmetic: grouping texts into batches, and what an encoder forward computes and moves."""
from __future__ import annotations

from typing import Any, Sequence

from common import memory


def make_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Text indices grouped into batches, in corpus order or shortest-first (so neighbours have similar lengths)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort_by_length else list(range(len(lengths)))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def encoder_forward_flops(config: Any, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one encoder forward on a padded batch: Q/K/V/O projections, feed-forward, attention scores."""
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    projections = 2 * seq_len * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * seq_len * seq_len * hidden  # QK^T and attention-weighted V
    return float(batch_size * layers * (projections + attention))


def encoder_forward_bytes(config: Any, batch_size: int, seq_len: int, weight_bytes: int, element_bytes: int) -> float:
    """A floor on the bytes one encoder forward moves: the streamed weights once, each matmul's input and output once.

    Per token and layer: Q/K/V read the hidden state and write three (6h), the output projection reads and writes
    one (2h), the feed-forward reads h, writes and reads the ffn-wide state, writes h (2h + 2 ffn); the attention
    scores (heads x seq x seq per text) are written once and read once.
    """
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    scores = 2 * batch_size * config.num_attention_heads * seq_len**2
    return float(weight_bytes + element_bytes * layers * (batch_size * seq_len * (10 * hidden + 2 * ffn) + scores))


def streamed_weight_bytes(model: Any) -> int:
    """Weight bytes a forward reads in full: all but the input embedding table, of which only the used rows are read."""
    return memory.weights_bytes(model) - model.get_input_embeddings().weight.nbytes
