"""Memory helpers: the peak sampler must see what a before/after difference misses; cleanup must free garbage."""
from __future__ import annotations

import mmap

import numpy as np
import torch

from common.memory import MIB, PeakRSSSampler, cleanup, rss_bytes, saved_for_backward_bytes, snapshot


def _short_lived_allocation(megabytes: int) -> None:
    # An anonymous mapping, not malloc: unmapping it returns the pages at once, whatever the heap's history.
    with mmap.mmap(-1, megabytes * MIB) as block:
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[:] = 1  # touch every page, so RSS really grows
        del pages


def test_sampler_catches_a_short_lived_200_mb_allocation():
    before = rss_bytes()
    with PeakRSSSampler(interval_s=0.001) as sampler:
        _short_lived_allocation(200)
    after = rss_bytes()
    assert after - before < 50 * MIB  # the before/after difference misses it...
    assert sampler.peak_delta_bytes > 180 * MIB  # ...the sampler does not


def test_snapshot_on_cpu_has_rss_and_no_cuda():
    current = snapshot()
    assert current.rss_bytes > 10 * MIB
    assert current.cuda_allocated_bytes == 0 and current.cuda_reserved_bytes == 0


def test_cleanup_frees_memory_held_only_by_a_reference_cycle():
    class Holder:
        pass

    first, second = Holder(), Holder()
    first.partner, second.partner = second, first
    first.block = np.ones(150 * MIB, dtype=np.uint8)
    del first, second  # unreachable now, but the cycle keeps the block alive until gc runs
    freed = cleanup()
    assert freed["rss_freed_bytes"] > 100 * MIB
    assert freed["cuda_reserved_freed_bytes"] == 0


def test_snapshot_rows_are_mib_against_the_first_step():
    from common.memory import MemorySnapshot, snapshot_rows

    rows = snapshot_rows([("start", MemorySnapshot(100 * MIB)), ("held", MemorySnapshot(160 * MIB, 2 * MIB, 4 * MIB))])
    assert [row["rss_vs_start_mib"] for row in rows] == [0, 60]
    assert (rows[1]["rss_mib"], rows[1]["cuda_allocated_mib"], rows[1]["cuda_reserved_mib"]) == (160, 2, 4)


def test_saved_for_backward_counts_activations_only_with_grad():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    inputs = torch.randn(3, 4)
    with_grad = saved_for_backward_bytes(model, lambda: model(inputs))
    assert with_grad >= inputs.nbytes + 3 * 8 * 4  # at least the input and the hidden activation, never weights
    with torch.no_grad():
        assert saved_for_backward_bytes(model, lambda: model(inputs)) == 0


def tiny_decoder(tied: bool) -> torch.nn.Module:
    """A one-layer Llama (SmolLM2's architecture) whose LM head is, or is not, its input embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_weights_bytes_counts_a_tied_lm_head_once():
    from common.memory import weights_bytes

    tied, untied = tiny_decoder(True), tiny_decoder(False)
    state = tied.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # one tensor, 2 keys
    embedding_bytes = 1000 * 32 * 4
    assert weights_bytes(tied) == sum(p.numel() for p in tied.parameters()) * 4  # parameters() lists it once
    assert weights_bytes(untied) - weights_bytes(tied) == embedding_bytes


def test_weights_bytes_counts_each_slice_of_one_storage():
    """Slices of one storage (a fused projection split in parts) are different weights, though of the same size."""
    from common.memory import weights_bytes

    fused = torch.nn.Module()
    query, key = torch.zeros(2, 16).unbind(0)
    fused.register_buffer("query", query)
    fused.register_buffer("key", key)
    assert weights_bytes(fused) == 2 * 16 * 4
