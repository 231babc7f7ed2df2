"""Dynamic int8 engines: activation range per CPU, 8-bit activations, Conv1D conversion, selective and torchao int8."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from common import quantize
from common.fidelity import cosine_fidelity


@pytest.mark.parametrize("flags, reduce_range, measure_both", [
    (["avx2", "avx512f", "avx512_vnni", "fma"], False, False),  # AVX-512 VNNI: int32 accumulation
    (["avx2", "avx_vnni", "fma"], False, False),  # client cores' AVX-VNNI
    (["avx2", "amx_int8", "amx_tile"], False, False),
    (["avx2", "fma"], True, True),  # AVX2 only: int16 pair sums can saturate, worth measuring both
    (["avx2", "avx512f", "fma"], True, True),  # AVX-512 without VNNI still sums pairs in int16
    ([], True, False),  # nothing known (e.g. ARM): PyTorch's safe default, nothing to compare
])
def test_activation_range_is_a_function_of_the_cpu_flags(flags, reduce_range, measure_both):
    choice = quantize.choose_activation_range(flags)
    assert (choice.reduce_range, choice.measure_both, choice.bits) == (reduce_range, measure_both,
                                                                         7 if reduce_range else 8)
    assert choice.reason


def test_stock_dynamic_linear_reduces_range_and_ours_does_not():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).eval()
    x = torch.randn(8, 64) * 3
    stock = quantize.quantize_dynamic_int8(nn.Sequential(linear), reduce_range=True)[0]
    full = quantize.quantize_dynamic_int8(nn.Sequential(linear), reduce_range=False)[0]
    assert type(full) is quantize.FullRangeDynamicLinear
    packed = stock._packed_params._packed_params
    # What the installed torch does: the stock module calls linear_dynamic with reduce_range=True.
    assert torch.equal(stock(x), torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True))
    assert torch.equal(full(x), torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False))
    # Same int8 weights, so the activations' eighth bit is the only difference. Whether it helps depends on the CPU
    # (AVX2 without VNNI can saturate it), which is why the lesson measures both there instead of asserting it.
    assert not torch.equal(full(x), stock(x))


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def test_layers_argument_quantises_exactly_those_layers():
    model = tiny_bert()
    names = quantize.linear_names(model)
    assert len(names) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer, plus the pooler
    quantised = quantize.quantize_dynamic_int8(model, reduce_range=True, layers=names[:2])
    assert quantize.linear_names(quantised) == names[2:]
    assert all(type(module) is nn.Linear for name, module in model.named_modules() if name in names)  # a copy
    with pytest.raises(ValueError, match="not nn.Linear"):
        quantize.quantize_dynamic_int8(model, reduce_range=True, layers=["embeddings.word_embeddings"])


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def embed_tokens(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (6, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state.mean(1)


def test_bnb_compute_dtype_and_variant_availability(pretend_gpu):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert (quantize.bnb_compute_dtype(cpu), quantize.bnb_compute_dtype(cuda)) == (torch.float32, torch.bfloat16)
    pretend_gpu.capability = (7, 5)  # a T4: bf16 would be emulated, fp16 is its tensor-core type
    assert quantize.bnb_compute_dtype(cuda) == torch.float16
    assert "CPU-only" in quantize.variant_unavailable("int8-dynamic", cuda)
    assert quantize.variant_unavailable("int8-dynamic", cpu) is None
    assert quantize.variant_unavailable("fp32", mps) is None
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert "MPS" in quantize.variant_unavailable("bnb-4bit", mps)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_bitsandbytes_4bit_counts_as_quantised_at_its_logical_size(tmp_path):
    from transformers import BitsAndBytesConfig

    tiny_bert().save_pretrained(tmp_path)
    fp32_share = quantize.quantized_share(BertModel.from_pretrained(tmp_path))
    four_bit = BertModel.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu", quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)))
    share = quantize.quantized_share(four_bit)
    # two 4-bit values share a byte, but the share counts the matrices' own elements, as for fp32
    assert share.matmul_elements == fp32_share.matmul_elements
    assert share.of_matmul == 1.0 and fp32_share.of_matmul == 0.0




def test_sensitivity_ranking_is_worst_first_and_puts_every_layer_back():
    model = tiny_bert()
    reference = embed_tokens(model)
    ranking = quantize.rank_sensitivity(model, embed_tokens, reduce_range=True)
    assert sorted(layer.name for layer in ranking) == sorted(quantize.linear_names(model))
    assert [layer.drop for layer in ranking] == sorted((layer.drop for layer in ranking), reverse=True)
    assert ranking[0].drop > 0
    torch.testing.assert_close(embed_tokens(model), reference, rtol=0, atol=0)  # every layer put back in fp32
    kept = {layer.name for layer in ranking[:3]}  # the worst three left in fp32, the rest int8, as 03 does it
    selective = quantize.quantize_dynamic_int8(model, True, [n for n in quantize.linear_names(model) if n not in kept])
    everything = quantize.quantize_dynamic_int8(model, reduce_range=True)
    assert set(quantize.linear_names(selective)) == kept
    worst = cosine_fidelity(reference, embed_tokens(everything))["cosine_mean"]
    assert cosine_fidelity(reference, embed_tokens(selective))["cosine_mean"] >= worst


def test_storage_columns_against_the_fp32_reference():
    from common.memory import weights_bytes

    model = tiny_bert()
    reference = weights_bytes(model)
    assert quantize.storage_columns(model, reference) == {"size_mib": reference / 2**20, "size_pct": 100.0,
                                                           "quantized_share": 0.0}
    int8 = quantize.storage_columns(quantize.quantize_dynamic_int8(model, reduce_range=True), reference)
    assert int8["quantized_share"] == 1.0 and int8["size_pct"] < 100
