"""End-to-end --quick run of lesson 02 plus checks of its facts, verdicts and claims against known values."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys

import pytest
import torch

from common import memory
from common.meter import VERDICT_WORDS
from tests.conftest import ROOT, is_png

CHARTS = ["params_stacked", "latency_vs_seq_length", "generation_tokens_per_s", "peak_memory"]
MODELS = ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "gpt2 (twin)", "bert-base-uncased (twin)", "t5-small (twin)"]
VERDICTS = {"faster", "slower", "same", "negligible", "inconclusive"}


@pytest.fixture(scope="module")
def lesson():
    return importlib.import_module("02_gpt_bert_t5_comparison")  # registered in sys.modules, as dataclasses need


@pytest.fixture(scope="module")
def run(lesson, tmp_path_factory):
    """One quick offline run of the default offline models, named both comma- and space-separated."""
    out, printed = tmp_path_factory.mktemp("lesson02"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = lesson.main(["--quick", "--source", "bundled", "--output-dir", str(out),
                            "--models", "decoder,encoder", "gpt2", "bert-base-uncased,t5-small"])
    return code, out, json.loads((out / "report.json").read_text(encoding="utf-8")), printed.getvalue()


def test_each_model_is_loaded_once_for_sections_1_to_3_and_once_to_measure_its_memory(run):
    printed = run[3]
    loads = [line for line in printed.splitlines() if line.startswith("[model]")]
    with_mlm_head = 1  # bert-base-uncased's twin is loaded a third time, with its masked-LM head, for fill-mask
    assert len(loads) == 2 * len(MODELS) + with_mlm_head, loads
    assert "Loading weights" not in printed  # transformers' progress bars are off
    assert max(len(line) for line in loads) <= 120


def facts_by_model(report: dict) -> dict[str, dict]:
    return {row["model"]: row for row in report["sections"]["1. Architectures"]["facts"]}


def test_run_completes_with_every_chart_and_one_summary_row_per_model(run):
    code, out, report, _ = run
    assert code == 0, report["failures"]
    assert report["failures"] == {}
    for name in CHARTS:
        assert is_png(out / f"{name}.png")
    assert [row["model"] for row in report["sections"]["5. Summary"]["models"]] == MODELS
    summary = {row["model"]: row for row in report["sections"]["5. Summary"]["models"]}
    assert summary["gpt2 (twin)"]["decode_tokens_per_s"] > 0 and summary["t5-small (twin)"]["ttft_ms"] > 0
    assert summary["bert-base-uncased (twin)"]["decode_tokens_per_s"] is None  # encoders do not generate
    assert all(row["fwd_ms@128"] > 0 and row["resident_mib"] > 0 for row in summary.values())
    assert len(report["sections"]["5. Summary"]["when_to_use"]) == 3
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()
    assert {model["source"] for model in report["models"]} == {"bundled", "twin"}


def test_impossible_generation_and_fill_mask_are_skipped_with_reasons(run):
    skipped = run[2]["skipped"]
    assert "cannot generate" in skipped["generation: bert-base-uncased (twin)"]
    assert "no masked-LM head" in skipped["fill-mask: all-MiniLM-L6-v2"]
    # the BERT twin is built with the real file's masked-LM head, so it fills the blank (its guesses are noise)
    assert "fill-mask: bert-base-uncased (twin)" not in skipped
    rows = run[2]["sections"]["2. One input, one line each"]
    assert [row["model"] for row in rows if row["pipeline"] == "fill-mask"] == ["bert-base-uncased (twin)"]


def test_unknown_name_stops_the_run_with_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "02_gpt_bert_t5_comparison.py"), "--quick", "--source",
                             "bundled", "--output-dir", str(tmp_path / "out"), "--models", "gpt2,no-such-model"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown model 'no-such-model'" in result.stderr
    assert "1. Architectures" not in result.stdout and not (tmp_path / "out").exists()


def test_models_may_be_comma_or_space_separated(lesson):
    comma = [c.label for c in lesson.plan_models("bundled", ["gpt2,t5-small"])]
    assert comma == [c.label for c in lesson.plan_models("bundled", ["gpt2", "t5-small"])]
    assert comma == ["gpt2 (twin)", "t5-small (twin)"]
    assert [c.label for c in lesson.plan_models("bundled", ["gpt2,gpt2", "gpt2"])] == ["gpt2 (twin)"]
    assert [c.kind for c in lesson.plan_models("bundled", ["decoder,encoder,t5-small"])] == [
        "decoder", "encoder", "seq2seq"]


def test_masking_is_shown_causal_or_bidirectional_by_the_probe(run):
    facts = facts_by_model(run[2])
    assert facts["gpt2 (twin)"]["masking"] == "causal"
    assert facts["SmolLM2-135M-Instruct"]["masking"] == "causal"
    assert facts["bert-base-uncased (twin)"]["masking"] == "bidirectional"
    assert facts["all-MiniLM-L6-v2"]["masking"] == "bidirectional"
    assert facts["t5-small (twin)"]["masking"] == "encoder bidirectional, decoder causal"
    assert facts["gpt2 (twin)"]["earlier_change"] < 1e-5 < facts["bert-base-uncased (twin)"]["earlier_change"]


def test_each_architecture_is_loaded_with_its_auto_class(run):
    facts = facts_by_model(run[2])
    assert facts["SmolLM2-135M-Instruct"]["class"] == "LlamaForCausalLM"
    assert facts["gpt2 (twin)"]["class"] == "GPT2LMHeadModel"
    assert facts["bert-base-uncased (twin)"]["class"] == "BertModel"
    assert facts["t5-small (twin)"]["class"] == "T5ForConditionalGeneration"


def test_parameter_split_matches_the_published_architectures(run):
    facts = facts_by_model(run[2])
    bert, gpt2, t5 = facts["bert-base-uncased (twin)"], facts["gpt2 (twin)"], facts["t5-small (twin)"]
    # BERT: word + position + token-type tables + the embedding LayerNorm (weight and bias)
    assert bert["embedding_params"] == 30522 * 768 + 512 * 768 + 2 * 768 + 2 * 768 == 23_837_184
    assert bert["params"] == 109_482_240
    # GPT-2: wte + wpe; the LM head is tied to wte and counted once
    assert gpt2["embedding_params"] == 50257 * 768 + 1024 * 768 == 39_383_808
    assert gpt2["params"] == 124_439_808
    # T5: one shared table plus the two relative-position bias tables (32 buckets x 8 heads)
    assert t5["embedding_params"] == 32128 * 512 + 2 * 32 * 8
    assert bert["fp32_mib"] == pytest.approx(109_482_240 * 4 / 2**20)
    assert bert["int8_mib"] == pytest.approx(bert["fp32_mib"] / 4)
    assert bert["disk_mib"] == pytest.approx(bert["fp32_mib"], rel=0.01)
    # as loaded (fp32): the parameters (the tied GPT-2 head once) plus at most a few small saved buffers
    for row in (bert, gpt2, t5):
        assert row["fp32_mib"] <= row["weights_mib"] < row["fp32_mib"] * 1.001
    assert (gpt2["layers"], gpt2["hidden"], gpt2["heads"], gpt2["max_positions"]) == ("12", 768, 12, 1024)
    assert t5["layers"] == "6 + 6"


def test_generation_is_timed_at_the_fixed_prompt_length_for_every_model(run, lesson):
    rows = run[2]["sections"]["3. Speed"]["generation"]
    assert {row["model"] for row in rows} == {"SmolLM2-135M-Instruct", "gpt2 (twin)", "t5-small (twin)"}
    assert all(row["prompt_tokens"] == lesson.QUICK.prompt_tokens and row["new_tokens"] == lesson.QUICK.new_tokens
               for row in rows)
    assert all(row["runs"] >= 3 and row["e2e_tokens_per_s"] > 0 and row["ttft_ms"] > 0 for row in rows)
    for row in rows:  # three separate figures: decode from the per-token cost, end to end from the whole call
        assert row["e2e_tokens_per_s"] == pytest.approx(row["new_tokens"] * 1e3 / row["p50_ms"])
        if row["decode_tokens_per_s"] is not None:
            assert row["decode_tokens_per_s"] == pytest.approx(1e3 / row["per_token_ms"])


def test_kv_cache_on_vs_off_is_a_verdict_and_the_advice_follows_it(run):
    sections = run[2]["sections"]
    kv_rows = {row["model"]: row for row in sections["3. Speed"]["kv_cache"]}
    assert set(kv_rows) == {"SmolLM2-135M-Instruct", "gpt2 (twin)", "t5-small (twin)"}
    assert kv_rows["SmolLM2-135M-Instruct"]["same_greedy_tokens"] is True
    advice = " ".join(sections["5. Summary"]["when_to_use"])
    for label, row in kv_rows.items():
        assert row["verdict"] in VERDICTS and row["rounds"] >= 3
        assert row["speedup_low"] <= row["speedup_high"]
        assert row["per_token_speedup"] is None or (
            row["per_token_low"] <= row["per_token_speedup"] <= row["per_token_high"]
            and row["per_token_verdict"] in VERDICTS)
        words = VERDICT_WORDS[row["verdict"]]
        assert f": {words} (" in row["sentence"]
        assert f"KV cache on vs off for {label}: {row['speedup']:.2f}x, {words} end to end" in advice
        assert row["kv_bytes_per_token"] == row["formula_bytes"]  # measured from the returned cache
    # SmolLM2: 30 layers x 2 x 3 kv_heads x 64 head_dim x 4 bytes; its 9 query heads share those 3 (GQA)
    smol = kv_rows["SmolLM2-135M-Instruct"]
    assert (smol["kv_bytes_per_token"], smol["heads"], smol["kv_heads"]) == (30 * 2 * 3 * 64 * 4, 9, 3)
    assert kv_rows["gpt2 (twin)"]["kv_bytes_per_token"] == 12 * 2 * 12 * 64 * 4  # no grouping
    assert kv_rows["t5-small (twin)"]["kv_bytes_per_token"] == 6 * 2 * 8 * 64 * 4  # the decoder's self-attention


@pytest.mark.parametrize("kind", ["decoder", "seq2seq"])
def test_kv_formula_matches_a_real_cache(lesson, kind):
    """layers x 2 x kv_heads x head_dim x bytes against the cache a tiny model really returns (GQA: 2 kv of 4 heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    ids = torch.arange(3, 13)[None]
    with torch.inference_mode():
        if kind == "decoder":
            config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)
            cache = LlamaForCausalLM(config)(input_ids=ids, use_cache=True).cache
        else:  # 2 encoder and 3 decoder layers: only the decoder's self-attention grows per token
            config = T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=3,
                              d_ff=32)
            cache = T5ForConditionalGeneration(config)(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=True).cache
    stored, tokens = lesson.kv_cache_bytes(cache)
    formula = memory.kv_cache_factors(config, 4)
    assert tokens == (10 if kind == "decoder" else 5)
    assert stored // tokens == formula["formula_bytes"] == (3 * 2 * 2 * 8 * 4 if kind == "decoder" else 3 * 2 * 4 * 8 * 4)
    assert formula["kv_heads"] == (2 if kind == "decoder" else 4)


def test_same_shape_encoder_and_decoder_are_compared_round_robin(run):
    speed = run[2]["sections"]["3. Speed"]
    # bert-base and gpt2 are both 12 layers x 768; no other encoder/decoder pair shares a shape
    (pair,) = speed["same_shape"]
    assert (pair["encoder"], pair["decoder"], pair["layers"], pair["hidden"], pair["seq_len"]) == (
        "bert-base-uncased (twin)", "gpt2 (twin)", 12, 768, 128)
    assert pair["verdict"] in VERDICTS and pair["rounds"] >= 3 and "rows" not in pair
    assert pair["sentence"] in " ".join(run[2]["sections"]["5. Summary"]["when_to_use"])
    # the pair's round-robin timings are the grid's batch-1 x 128 cells of both models, not a second measurement
    cells = {row["model"]: row for row in speed["forward"] if row["batch"] == 1 and row["seq_len"] == 128}
    encoder, decoder = cells["bert-base-uncased (twin)"], cells["gpt2 (twin)"]
    assert encoder["runs"] == decoder["runs"] == pair["rounds"]
    assert (encoder["p50_ms"], decoder["p50_ms"]) == (pair["encoder_p50_ms"], pair["decoder_p50_ms"])
    # one estimator: the decoder's cell is the encoder's median at the paired ratio, so the cells agree with it
    assert decoder["p50_ms"] == pytest.approx(encoder["p50_ms"] * pair["speedup"])
    assert decoder["p50_ms_own_median"] > 0 and decoder["ci95_low_ms"] <= decoder["p50_ms"] <= decoder["ci95_high_ms"]
    assert pair["speedup_low"] <= pair["speedup"] <= pair["speedup_high"]


def test_twin_text_is_never_shown_as_language(run, lesson):
    rows = run[2]["sections"]["2. One input, one line each"]
    twin_outputs = [row["output"] for row in rows
                    if row["model"].endswith("(twin)") and row["pipeline"] != "feature-extraction"]
    assert twin_outputs and all(output == lesson.TWIN_NOTE for output in twin_outputs)
    real = next(row for row in rows if row["model"] == "SmolLM2-135M-Instruct")
    assert real["pipeline"] == "text-generation" and real["output"] != lesson.TWIN_NOTE and real["output"]


def test_pipeline_rows_count_each_tokenizers_tokens(run, lesson):
    rows = {row["model"]: row for row in run[2]["sections"]["2. One input, one line each"]}
    assert rows["SmolLM2-135M-Instruct"]["input_tokens"] == 9  # 'The best way to learn a new language is'
    assert rows["all-MiniLM-L6-v2"]["input_tokens"] == 11  # the same 9 words plus [CLS] and [SEP]
    assert rows["gpt2 (twin)"]["input_tokens"] == 9  # the twin borrows SmolLM2's tokenizer
    twins = run[2]["sections"]["5. Summary"]["twins"]
    assert "fixed token counts" in twins and f"{lesson.QUICK.prompt_tokens}-token prompt" in twins
    assert "speed and memory are the real model's" not in twins


def test_memory_is_given_back_after_each_release(run):
    for row in run[2]["sections"]["4. Memory"]:
        assert row["resident_mib"] > row["after_release_mib"]
        assert row["after_release_mib"] < 50  # MiB left above the pre-load RSS once the model is released
        assert row["activation_peak_mib"] == max(row["activation_mib@32"], row["activation_mib@128"])


def test_memory_reports_time_to_first_inference_and_resident_weights(run):
    for row in run[2]["sections"]["4. Memory"]:
        assert row["ttfi_s"] == pytest.approx(row["load_s"] + row["first_forward_s"])
        assert row["first_forward_s"] > 0
        # the weights are resident after the first forward (mapped pages read in), and the activations come on top
        assert row["resident_mib"] > 0.5 * row["weights_mib"]  # pages of unused embedding rows may stay out
        assert row["activation_peak_mib"] < row["resident_mib"]


def test_memory_mapping_is_only_claimed_where_the_numbers_show_it(lesson):
    row = {"model": "m", "weights_mib": 500.0, "resident_mib": 520.0, "load_cuda_peak_mib": 505.0, "load_s": 0.1,
           "ttfi_s": 0.9}
    mapped = lesson.memory_note({**row, "after_load_mib": 60.0}, torch.device("cpu"))
    assert "memory-mapped" in mapped and "0.90 s to first inference" in mapped
    read_in = lesson.memory_note({**row, "after_load_mib": 510.0}, torch.device("cpu"))  # e.g. a dtype conversion
    assert "memory-mapped" not in read_in and "read into memory during the load" in read_in
    gpu = {**row, "after_load_mib": 600.0, "cuda_peak_mib@32": 12.0, "cuda_peak_mib@128": 40.0,
           "cuda_after_release_mib": 0.0, "cuda_reserved_after_release_mib": 2.0}
    on_gpu = lesson.memory_note(gpu, torch.device("cuda:1"))
    assert "memory-mapped" not in on_gpu and "allocated 505 MiB of cuda:1 memory" in on_gpu
    assert "a forward up to 40 MiB more" in on_gpu and "0 MiB stayed allocated and 2 MiB reserved" in on_gpu
    assert "Host RSS (+600 MiB) is mostly the CUDA context" in on_gpu  # not quoted as the model's memory


def test_length_above_max_positions_is_skipped_with_a_reason(lesson):
    assert "above the model's 512 positions" in lesson.forward_skip_reason(1024, 1, 512, None, 2.5)
    assert lesson.forward_skip_reason(512, 1, 512, None, 2.5) is None
    assert "per-call budget" in lesson.forward_skip_reason(512, 8, 1024, (128, 1.0), 2.5)


def test_defaults_offline_are_the_bundled_models_plus_the_twins(lesson):
    assert [c.label for c in lesson.plan_models("bundled", None)] == MODELS


def test_settings_keep_quick_and_full_side_by_side(lesson):
    assert lesson.QUICK.prompt_tokens < lesson.FULL.prompt_tokens and lesson.FULL.prompt_tokens >= 256
    assert lesson.SUMMARY_LENGTH in lesson.QUICK.seq_lengths and lesson.SUMMARY_LENGTH in lesson.FULL.seq_lengths
    assert lesson.QUICK.warmup >= 1 and lesson.FULL.warmup >= 1
