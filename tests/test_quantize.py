"""Dynamic int8 engines: activation range per CPU, 8-bit activations, Conv1D conversion, selective and torchao int8."""
from __future__ import annotations

import builtins
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


def test_conv1d_to_linear_keeps_outputs_and_lets_int8_reach_every_matmul():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
    only_head = quantize.quantized_share(quantize.quantize_dynamic_int8(model, reduce_range=True))
    assert only_head.quantized_elements == 64 * 32  # lm_head alone: Conv1D is not an nn.Linear
    assert only_head.of_matmul < 0.1

    assert quantize.conv1d_to_linear(model) == 4 * 2  # c_attn, c_proj, c_fc, mlp c_proj per block
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    share = quantize.quantized_share(quantize.quantize_dynamic_int8(model, reduce_range=True))
    assert share.of_matmul == 1.0
    # per block c_attn, attention c_proj, c_fc, mlp c_proj; then lm_head: the embeddings are not matmul weights
    assert share.matmul_elements == 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 64 * 32


def embed_tokens(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (6, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state.mean(1)


def test_sensitivity_ranking_and_selective_int8_keep_exactly_the_worst_k():
    model = tiny_bert()
    reference = embed_tokens(model)
    ranking = quantize.rank_sensitivity(model, embed_tokens, reduce_range=True)
    assert sorted(layer.name for layer in ranking) == sorted(quantize.linear_names(model))
    assert [layer.drop for layer in ranking] == sorted((layer.drop for layer in ranking), reverse=True)
    assert ranking[0].drop > 0
    torch.testing.assert_close(embed_tokens(model), reference, rtol=0, atol=0)  # every layer put back in fp32

    selective, kept = quantize.quantize_selective(model, ranking, keep_fp32=3, reduce_range=True)
    assert kept == [layer.name for layer in ranking[:3]]
    assert quantize.linear_names(selective) == [name for name in quantize.linear_names(model) if name in kept]
    everything = quantize.quantize_dynamic_int8(model, reduce_range=True)
    worst = cosine_fidelity(reference, embed_tokens(everything))["cosine_mean"]
    assert cosine_fidelity(reference, embed_tokens(selective))["cosine_mean"] >= worst
    with pytest.raises(ValueError):
        quantize.quantize_selective(model, ranking, keep_fp32=len(ranking) + 1, reduce_range=True)


def test_torchao_says_why_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert "not installed" in quantize.torchao_unavailable()


@pytest.mark.skipif(quantize.torchao_unavailable() is not None, reason="torchao is not usable here")
def test_torchao_int8_quantises_every_linear_and_stays_close():
    from common.memory import weights_bytes

    model = tiny_bert()
    quantised = quantize.quantize_torchao_int8(model)
    assert quantize.quantized_share(quantised).of_matmul == 1.0
    assert quantize.quantized_share(model).quantized_elements == 0  # the original is untouched
    int8 = quantize.storage_columns(quantised, weights_bytes(model))  # its weights are tensor subclasses
    assert int8["quantized_share"] == 1.0 and int8["size_pct"] < 100
    assert cosine_fidelity(embed_tokens(model), embed_tokens(quantised))["cosine_mean"] > 0.99


def test_int8_dynamic_copies_and_reaches_gpt2_conv1d():
    model = tiny_gpt2()
    quantised = quantize.int8_dynamic(model, reduce_range=True)
    assert quantize.quantized_share(quantised).of_matmul == 1.0  # Conv1D converted first, so every matmul is int8
    assert quantize.quantized_share(model).quantized_elements == 0  # the original keeps its fp32 Conv1Ds
    per_tensor = quantize.int8_dynamic(tiny_bert(), reduce_range=True, per_channel=False)
    assert per_tensor.encoder.layer[0].attention.self.query.weight().qscheme() == torch.per_tensor_affine


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


def test_storage_columns_against_the_fp32_reference():
    from common.memory import weights_bytes

    model = tiny_bert()
    reference = weights_bytes(model)
    assert quantize.storage_columns(model, reference) == {"size_mib": reference / 2**20, "size_pct": 100.0,
                                                           "quantized_share": 0.0}
    int8 = quantize.storage_columns(quantize.int8_dynamic(model, reduce_range=True), reference)
    assert int8["quantized_share"] == 1.0 and int8["size_pct"] < 100


def test_mixed_int8_keeps_the_named_linears_in_their_dtype_and_the_rest_int8():
    model = tiny_bert()
    names = quantize.linear_names(model)
    kept = [names[4], names[5]]
    mixed = quantize.quantize_mixed(model, kept, torch.bfloat16, reduce_range=True)
    casts = {name: module for name, module in mixed.named_modules() if isinstance(module, quantize.CastLinear)}
    assert sorted(casts) == sorted(kept) and all(c.linear.weight.dtype == torch.bfloat16 for c in casts.values())
    share = quantize.quantized_share(mixed)
    assert share.quantized_elements == sum(module.weight.numel() for name, module in model.named_modules()
                                           if name in names and name not in kept)
    assert model.get_submodule(kept[0]).weight.dtype == torch.float32  # the original is untouched
    fp32_kept = quantize.quantize_mixed(model, kept, torch.float32, reduce_range=True)
    assert quantize.linear_names(fp32_kept) == kept  # plain fp32 Linears, no cast
    reference = embed_tokens(model)
    everything = cosine_fidelity(reference, embed_tokens(quantize.quantize_dynamic_int8(model, True)))["cosine_mean"]
    assert cosine_fidelity(reference, embed_tokens(fp32_kept))["cosine_mean"] >= everything - 1e-6
    assert embed_tokens(mixed).dtype == torch.float32  # a bf16 layer casts back: the model stays fp32 outside


def test_cast_linear_computes_in_its_dtype_and_returns_the_input_dtype():
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 4), torch.randn(3, 8)
    expected = nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()).float()
    cast = quantize.CastLinear(linear, torch.bfloat16)
    assert torch.equal(cast(x), expected) and cast(x).dtype == torch.float32


def test_pt2e_says_why_when_torchao_is_missing(monkeypatch):
    real_import = builtins.__import__

    def missing(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ModuleNotFoundError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    reason = quantize.pt2e_unavailable()
    assert reason == "torchao's PT2E does not import: ModuleNotFoundError: No module named 'torchao'"


@pytest.mark.skipif(quantize.pt2e_unavailable() is not None, reason="torchao's PT2E is not usable here")
def test_pt2e_export_quantises_the_linears_and_serves_other_shapes():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = tiny_bert()
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(3))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prepared = prepare_pt2e(quantize.export_encoder(model, example), quantize.x86_dynamic_quantizer(True))
    prepared(*example.values())
    encoder = quantize.ExportedEncoder(convert_pt2e(prepared), model.config, list(example))
    ops = {str(node.target) for node in encoder.graph.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    other = torch.randint(1, 100, (1, 4), generator=torch.Generator().manual_seed(4))  # one short text: dynamic
    with torch.inference_mode():
        expected = model(input_ids=other).last_hidden_state.mean(1)
        got = encoder(input_ids=other, attention_mask=torch.ones_like(other)).last_hidden_state.mean(1)
    assert got.shape == expected.shape and cosine_fidelity(expected, got)["cosine_mean"] > 0.99


def test_smoothing_folds_exactly_and_moves_scale_into_the_weights():
    model = tiny_bert()
    with torch.no_grad():  # an outlier channel, as trained transformers have: what smoothing is for
        model.embeddings.LayerNorm.weight[3] = 20.0
    smoothed = quantize.smooth_bert(model, embed_tokens, alpha=0.5)
    groups = quantize.bert_smooth_groups(model)
    assert [group.norm for group in groups] == ["embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
                                                "encoder.layer.0.output.LayerNorm",
                                                "encoder.layer.1.attention.output.LayerNorm"]
    assert groups[2].linears == tuple(f"encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value"))
    torch.testing.assert_close(embed_tokens(smoothed), embed_tokens(model), rtol=0, atol=1e-5)  # exact in fp32
    query = "encoder.layer.0.attention.self.query"
    ratio = smoothed.get_submodule(query).weight / model.get_submodule(query).weight
    scale = smoothed.get_submodule("encoder.layer.0.attention.output").smooth_scale
    torch.testing.assert_close(ratio, scale.expand_as(ratio))  # each input column times its s_j
    assert not torch.allclose(scale, torch.ones_like(scale)) and int(scale.argmax()) == 3  # the outlier moved most
    torch.testing.assert_close(smoothed.embeddings.LayerNorm.weight * scale, model.embeddings.LayerNorm.weight)
    assert quantize.linear_names(smoothed) == quantize.linear_names(model)  # the kept list still names them
    assert model.encoder.layer[0].attention.self.query.weight is not smoothed.get_submodule(query).weight  # a copy
    int8 = quantize.quantize_dynamic_int8(smoothed, reduce_range=True)
    assert cosine_fidelity(embed_tokens(model), embed_tokens(int8))["cosine_mean"] > 0.99
