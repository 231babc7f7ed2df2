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


def test_each_model_is_loaded_once_for_sections_1_to_3_and_once_more_quietly_for_its_memory(run):
    printed, memory_rows = run[3], run[2]["sections"]["4. Memory"]
    loads = [line for line in printed.splitlines() if line.startswith("[model]")]
    with_mlm_head = 1  # bert-base-uncased's twin is loaded again, with its masked-LM head, for fill-mask
    assert len(loads) == len(MODELS) + with_mlm_head, loads  # memory's own loads: their time is in its table
    assert [row["model"] for row in memory_rows] == MODELS and all(row["load_s"] > 0 for row in memory_rows)
    assert "Loading weights" not in printed  # transformers' progress bars are off
    assert max(len(line) for line in printed.splitlines()) <= 120


def test_run_completes_with_every_chart_and_one_finding_per_architecture(run):
    code, out, report, _ = run
    assert code == 0, report["failures"]
    assert report["failures"] == {}
    for name in CHARTS:
        assert is_png(out / f"{name}.png")
    findings = report["sections"]["5. When to use which"]
    assert [line.split(" (")[0] for line in findings] == [
        "Decoder-only", "Encoder-only", "Encoder-decoder", "Same depth and width, bert-base-uncased"]
    assert findings[0].startswith("Decoder-only (causal)") and findings[1].startswith("Encoder-only (bidirectional)")
    assert findings[2].startswith("Encoder-decoder (encoder bidirectional, decoder causal)")
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()
    assert {model["source"] for model in report["models"]} == {"bundled", "twin"}


def test_run_says_which_models_are_real_and_which_are_twins_before_section_1(run):
    intro = " ".join(run[3][:run[3].index("1. Architectures")].split())
    assert "Real (trained) models: SmolLM2-135M-Instruct, all-MiniLM-L6-v2." in intro
    assert "Twins: gpt2 (twin), bert-base-uncased (twin), t5-small (twin): " in intro and "random weights" in intro


def test_the_notes_table_is_shown_whole_with_what_this_run_can_and_cannot_check(run):
    section = run[2]["sections"]["1. Architectures"]
    assert [row["strengths"] for row in section["notes_table"]] == [
        "long text generation", "bidirectional understanding", "text-to-text approach"]
    assert "Checked here" in section["notes_checked"] and "Not checked" in section["notes_checked"]
    assert "typical uses" in run[3] and "classification, NER, QA" in run[3]


def test_impossible_generation_and_fill_mask_are_skipped_with_reasons(run):
    skipped = run[2]["skipped"]
    assert "no LM head" in skipped["generation: bert-base-uncased (twin)"]
    assert "no LM head" in skipped["generation: all-MiniLM-L6-v2"]
    assert "no masked-LM head" in skipped["fill-mask: all-MiniLM-L6-v2"]
    # the BERT twin is built with the real file's masked-LM head, so it fills the blank (its guesses are noise)
    assert "fill-mask: bert-base-uncased (twin)" not in skipped
    rows = run[2]["sections"]["2. One input, one line each"]
    assert [row["model"] for row in rows if row["pipeline"] == "fill-mask"] == ["bert-base-uncased (twin)"]


def test_generation_is_timed_at_the_fixed_prompt_length_for_every_model(run, lesson):
    rows = run[2]["sections"]["3. Speed"]["generation"]
    assert [row["model"] for row in rows] == ["SmolLM2-135M-Instruct", "gpt2 (twin)", "t5-small (twin)"]
    assert all(row["prompt_tokens"] == lesson.QUICK.prompt_tokens and row["new_tokens"] == lesson.QUICK.new_tokens
               for row in rows)
    assert all(row["rounds"] >= 3 and row["e2e_tokens_per_s"] > 0 and row["ttft_ms"] > 0 for row in rows)


def test_each_generation_table_shows_its_own_medians(run, lesson):
    """items/s is the new tokens of one call over that row's OWN median; ttft is the first-token row's median."""
    shown = [row for row in run[2]["rows"] if row.get("workload") in ("first token", "cache on", "cache off")]
    assert len(shown) == 3 * 3 and all(row["section"] == "3. Speed" for row in shown)
    for row in shown:
        per_call = 1 if row["workload"] == "first token" else lesson.QUICK.new_tokens
        assert row["items_per_s"] == pytest.approx(per_call * 1e3 / row["p50_ms"])
        assert (row["verdict"] == "baseline") == (row["workload"] == "cache off")
        assert (row["verdict"] == "-") == (row["workload"] == "first token")  # 1 token is no like-for-like ratio
    assert sorted(row["p50_ms"] for row in shown if row["workload"] == "first token") == sorted(
        row["ttft_ms"] for row in run[2]["sections"]["3. Speed"]["generation"])
    decoded = [row["decode_tok_s"] for row in shown if row["workload"] != "first token"]
    assert all(value is None or value > 0 for value in decoded)


def test_kv_cache_on_vs_off_is_a_verdict_and_the_summary_names_it_without_its_numbers(run):
    sections = run[2]["sections"]
    kv_rows = {row["model"]: row for row in sections["3. Speed"]["generation"]}
    assert kv_rows["SmolLM2-135M-Instruct"]["same_greedy_tokens"] is True
    findings = {line.split(" (")[0]: line for line in sections["5. When to use which"]}
    for label, row in kv_rows.items():
        assert row["verdict"] in VERDICTS and row["rounds"] >= 3
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
        assert row["per_token_speedup"] is None or (
            row["per_token_low"] <= row["per_token_speedup"] <= row["per_token_high"]
            and row["per_token_verdict"] in VERDICTS)
        finding = findings[row["architecture"].capitalize()]
        verdict = f"KV cache {VERDICT_WORDS[row['verdict']]} for "
        assert verdict in finding and label in finding[finding.index(verdict):]
        assert f"{row['speedup']:.2f}x" not in finding  # the ratio is stated once, in its table
        assert row["kv_bytes_per_token"] == row["formula_bytes"]  # measured from the returned cache
    # SmolLM2: 30 layers x 2 x 3 kv_heads x 64 head_dim x 4 bytes; its 9 query heads share those 3 (GQA)
    smol = kv_rows["SmolLM2-135M-Instruct"]
    assert (smol["kv_bytes_per_token"], smol["heads"], smol["kv_heads"]) == (30 * 2 * 3 * 64 * 4, 9, 3)
    assert kv_rows["gpt2 (twin)"]["kv_bytes_per_token"] == 12 * 2 * 12 * 64 * 4  # no grouping
    assert kv_rows["t5-small (twin)"]["kv_bytes_per_token"] == 6 * 2 * 8 * 64 * 4  # the decoder's self-attention
    assert "SmolLM2-135M-Instruct: 9 query heads share 3 K/V heads, a 3x smaller cache." in " ".join(run[3].split())


def test_every_model_is_timed_in_the_same_rounds_and_the_same_shape_pair_is_named(run):
    speed = run[2]["sections"]["3. Speed"]
    # bert-base and gpt2 are both 12 layers x 768; no other encoder/decoder pair shares a shape
    pair = speed["same_shape"]
    assert (pair["encoder"], pair["decoder"], pair["layers"], pair["hidden"], pair["seq_len"]) == (
        "bert-base-uncased (twin)", "gpt2 (twin)", 12, 768, 128)
    assert pair["verdict"] in VERDICTS and pair["rounds"] >= 3
    turns = {row["workload"]: row for row in run[2]["rows"] if row.get("workload") in MODELS}
    assert set(turns) == set(MODELS) and turns["gpt2 (twin)"]["verdict"] == "baseline"  # the pair's decoder
    encoder = turns["bert-base-uncased (twin)"]
    assert (encoder["speedup"], encoder["speedup_low"], encoder["speedup_high"]) == (
        pair["speedup"], pair["speedup_low"], pair["speedup_high"])  # the pair's ratio is that row's
    # the grid's batch-1 x 128 cells are those rounds' own medians: one measurement, never a median x a ratio
    cells = {row["model"]: row for row in speed["forward"] if row["batch"] == 1 and row["seq_len"] == 128}
    assert set(cells) == set(MODELS)
    for label, cell in cells.items():
        assert (cell["p50_ms"], cell["runs"]) == (turns[label]["p50_ms"], turns[label]["runs"])
        assert cell["ci95_low_ms"] <= cell["p50_ms"] <= cell["ci95_high_ms"]


def test_memory_mapping_and_every_other_explanation_is_printed_once(run):
    printed = " ".join(run[3].split())
    for phrase in ("memory-maps", "Caching is exact because", "Model size confounds architecture", "ttft (time to",
                   "End to end counts the first token", "RSS (resident set size)", "Masking probe:", "Twins:"):
        assert printed.count(phrase) == 1, phrase
    short = [row["model"] for row in run[2]["sections"]["4. Memory"] if row["resident_mib"] < row["weights_mib"]]
    assert ("resident below the weights" in printed) == bool(short)


def facts_by_model(report: dict) -> dict[str, dict]:
    return {row["model"]: row for row in report["sections"]["1. Architectures"]["facts"]}


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
    assert facts["t5-small (twin)"]["change"].endswith(" / 0")  # its encoder moved, its decoder did not


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
            model = T5ForConditionalGeneration(config)
            cache = model(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=True).cache
    stored, tokens = lesson.kv_cache_bytes(cache)
    formula = memory.kv_cache_factors(config, 4)
    assert tokens == (10 if kind == "decoder" else 5)
    expected = 3 * 2 * 2 * 8 * 4 if kind == "decoder" else 3 * 2 * 4 * 8 * 4
    assert stored // tokens == formula["formula_bytes"] == expected
    assert formula["kv_heads"] == (2 if kind == "decoder" else 4)


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


def test_memory_is_given_back_after_each_release(run):
    for row in run[2]["sections"]["4. Memory"]:
        assert row["resident_mib"] > row["after_free_mib"]
        assert row["after_free_mib"] < 50  # MiB left above the pre-load RSS once the model is released
        assert row["activation_mib"] == max(row["activation_mib@32"], row["activation_mib@128"])


def test_memory_reports_time_to_first_inference_and_resident_weights(run):
    for row in run[2]["sections"]["4. Memory"]:
        assert row["ttfi_s"] == pytest.approx(row["load_s"] + row["first_forward_s"])
        assert row["first_forward_s"] > 0
        # the weights are resident after the first forward (mapped pages read in), and the activations come on top
        assert row["resident_mib"] > 0.5 * row["weights_mib"]  # pages of unused embedding rows may stay out
        assert row["activation_mib"] < row["resident_mib"]


def test_length_above_max_positions_is_skipped_with_a_reason(lesson):
    assert "above the model's 512 positions" in lesson.forward_skip_reason(1024, 1, 512, None, 2.5)
    assert lesson.forward_skip_reason(512, 1, 512, None, 2.5) is None
    assert "above 2.5 s a call" in lesson.forward_skip_reason(512, 8, 1024, (128, 1.0), 2.5)  # 32 s predicted
    assert lesson.forward_skip_reason(32, 8, 1024, (128, 1.0), 2.5) is None  # 2 s predicted


def test_defaults_offline_are_the_bundled_models_plus_the_twins(lesson):
    assert [c.label for c in lesson.plan_models("bundled", None)] == MODELS


def test_settings_keep_quick_and_full_side_by_side(lesson):
    assert lesson.QUICK.prompt_tokens < lesson.FULL.prompt_tokens and lesson.FULL.prompt_tokens >= 256
    assert lesson.SAME_LENGTH in lesson.QUICK.seq_lengths and lesson.SAME_LENGTH in lesson.FULL.seq_lengths
    assert lesson.QUICK.warmup >= 1 and lesson.FULL.warmup >= 1
