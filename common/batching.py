"""Batching: grouping texts into padded batches, what padding wastes, and what an encoder forward costs."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from common import memory


def make_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Text indices grouped into batches, in corpus order or shortest-first (so neighbours have similar lengths)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort_by_length else list(range(len(lengths)))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padding_waste(batches: Sequence[Sequence[int]], pad_to: int | None = None) -> dict[str, float]:
    """Token slots computed vs real tokens for batches of sequence lengths.

    pad_to=None is dynamic padding (each batch pads to its own longest text); an int pads every text to it.
    """
    real = sum(sum(batch) for batch in batches)
    slots = sum(len(batch) * (pad_to if pad_to is not None else max(batch)) for batch in batches if batch)
    return {"real_tokens": real, "padded_slots": slots, "waste_pct": 100.0 * (slots - real) / slots if slots else 0.0}


def batch_shapes(lengths: Sequence[int], batches: Sequence[Sequence[int]],
                 pad_to: int | None = None) -> set[tuple[int, int]]:
    """The distinct (texts, padded length) shapes batches of text indices give a model: what a compiler sees."""
    return {(len(batch), pad_to if pad_to is not None else max(lengths[i] for i in batch))
            for batch in batches if batch}


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


def padded_batches(tokenizer: Any, encoded: Any, groups: list[list[int]], pad_to: int | None,
                   device: torch.device) -> list[Any]:
    """Pre-tokenised texts grouped into batches, each padded to `pad_to` or (None) to its own longest text."""
    return [tokenizer.pad({key: [encoded[key][i] for i in group] for key in encoded}, return_tensors="pt",
                          padding="max_length" if pad_to else "longest", max_length=pad_to).to(device)
            for group in groups]



def batch_work(config: Any, batches: list[Any], lengths: Sequence[int], groups: Sequence[Sequence[int]],
               pad_to: int | None, weight_bytes: int, element_bytes: int = 4) -> dict[str, float]:
    """One encoder pass over padded batches: matmul FLOPs computed, the useful ones (real tokens only, each text as
    if alone), the bytes moved, and what the padding wastes."""
    return {"flops": sum(encoder_forward_flops(config, *batch["input_ids"].shape) for batch in batches),
            "useful_flops": sum(encoder_forward_flops(config, 1, lengths[i]) for group in groups for i in group),
            "bytes": sum(encoder_forward_bytes(config, *batch["input_ids"].shape, weight_bytes, element_bytes)
                         for batch in batches),
            **padding_waste([[lengths[i] for i in group] for group in groups], pad_to)}
