"""End-to-end --quick run of 02_gpt_bert_t5_comparison plus checks of its architecture facts against known values."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from common.errors import UserError

SCRIPT = Path(__file__).resolve().parents[1] / "02_gpt_bert_t5_comparison.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ["params_stacked", "latency_vs_seq_length", "generation_tokens_per_s", "peak_memory"]
MODELS = ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "gpt2 (twin)", "bert-base-uncased (twin)", "t5-small (twin)"]


def load_script():
    spec = importlib.util.spec_from_file_location("lesson02", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lesson():
    return load_script()


@pytest.fixture(scope="module")
def run(lesson, tmp_path_factory):
    """One quick offline run with the default models plus one unknown name, which must be skipped, not fatal."""
    out = tmp_path_factory.mktemp("lesson02")
    code = lesson.main(["--quick", "--source", "bundled", "--output-dir", str(out),
                        "--models", *lesson.OFFLINE_MODELS, "no-such-model"])
    return code, out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def facts_by_model(report: dict) -> dict[str, dict]:
    return {row["model"]: row for row in report["sections"]["1. Architectures"]["facts"]}


def test_run_completes_with_every_chart_and_one_summary_row_per_model(run):
    code, out, report = run
    assert code == 0, report["failures"]
    assert report["failures"] == {}
    for name in CHARTS:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [row["model"] for row in report["sections"]["5. Summary"]["models"]] == MODELS
    summary = {row["model"]: row for row in report["sections"]["5. Summary"]["models"]}
    assert summary["gpt2 (twin)"]["tokens_per_s"] > 0 and summary["t5-small (twin)"]["tokens_per_s"] > 0
    assert summary["bert-base-uncased (twin)"]["tokens_per_s"] is None  # encoders do not generate
    assert all(row["fwd_ms@128"] > 0 and row["peak_mib"] > 0 for row in summary.values())
    assert len(report["sections"]["5. Summary"]["when_to_use"]) == 3
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def test_unknown_model_and_impossible_generation_are_skipped_with_reasons(run):
    _, _, report = run
    assert "unknown model 'no-such-model'" in report["skipped"]["model no-such-model"]
    assert "cannot generate" in report["skipped"]["generation: bert-base-uncased (twin)"]
    assert "no masked-LM head" in report["skipped"]["fill-mask: all-MiniLM-L6-v2"]


def test_masking_is_shown_causal_or_bidirectional_by_the_probe(run):
    facts = facts_by_model(run[2])
    assert facts["gpt2 (twin)"]["masking"] == "causal"
    assert facts["SmolLM2-135M-Instruct"]["masking"] == "causal"
    assert facts["bert-base-uncased (twin)"]["masking"] == "bidirectional"
    assert facts["all-MiniLM-L6-v2"]["masking"] == "bidirectional"
    assert facts["t5-small (twin)"]["masking"] == "encoder bidirectional, decoder causal"
    assert facts["gpt2 (twin)"]["earlier_change"] < 1e-5 < facts["bert-base-uncased (twin)"]["earlier_change"]


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
    assert (gpt2["layers"], gpt2["hidden"], gpt2["heads"], gpt2["max_positions"]) == ("12", 768, 12, 1024)
    assert t5["layers"] == "6 + 6"


def test_kv_cache_on_and_off_give_identical_greedy_tokens(run):
    kv_rows = {row["model"]: row for row in run[2]["sections"]["3. Speed"]["kv_cache"]}
    assert set(kv_rows) == {"SmolLM2-135M-Instruct", "gpt2 (twin)"}  # the decoders; T5 runs with the cache only
    assert kv_rows["SmolLM2-135M-Instruct"]["same_greedy_tokens"] is True
    assert all(row["tokens_per_s_cache_off"] > 0 for row in kv_rows.values())


def test_twin_text_is_never_shown_as_language(run, lesson):
    rows = run[2]["sections"]["2. One input, one line each"]
    twin_outputs = [row["output"] for row in rows
                    if row["model"].endswith("(twin)") and row["pipeline"] != "feature-extraction"]
    assert twin_outputs and all(output == lesson.TWIN_NOTE for output in twin_outputs)
    real = next(row for row in rows if row["model"] == "SmolLM2-135M-Instruct")
    assert real["pipeline"] == "text-generation" and real["output"] != lesson.TWIN_NOTE and real["output"]


def test_memory_is_given_back_after_each_release(run):
    for row in run[2]["sections"]["4. Memory"]:
        assert row["peak_mib@32"] > row["after_release_mib"]
        assert row["after_release_mib"] < 50  # MiB left above the pre-load RSS once the model is released


def test_length_above_max_positions_is_skipped_with_a_reason(lesson):
    assert "above the model's 512 positions" in lesson.forward_skip_reason(1024, 1, 512, None, 2.5)
    assert lesson.forward_skip_reason(512, 1, 512, None, 2.5) is None
    assert "per-call budget" in lesson.forward_skip_reason(512, 8, 1024, (128, 1.0), 2.5)


def test_defaults_offline_are_the_bundled_models_plus_the_twins(lesson):
    assert lesson.default_models("bundled") == ["decoder", "encoder", "gpt2", "bert-base-uncased", "t5-small"]


def test_only_unknown_models_is_a_clear_user_error(lesson, tmp_path):
    with pytest.raises(UserError, match="none of the requested models"):
        lesson.main(["--quick", "--source", "bundled", "--output-dir", str(tmp_path), "--models", "nope", "gpt5"])
