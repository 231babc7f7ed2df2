"""End-to-end and bad-input tests for 01_autotokenizer_automodel.py (one --quick run shared by the module)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY
from conftest import is_png, load_script, verdict_of

from common import cli
from common import texts as common_texts
from common.errors import UserError
from common.report import ratio_cell

USER_TEXT = "Ich trinke gern Tee am Morgen."
S1, S2, S3, S4, S5 = ("1. Tokenizer encode/decode", "2. AutoModel by hand", "3. pipeline()", "4. Manual vs pipeline",
                      "5. Custom pipelines")
ROW_KEYS = {"p50_ms", "iqr_ms", "runs", "items_per_s", "noisy"}


def flat(text: str) -> str:
    """Printed text with its wrapping undone: sentences are wrapped at 100 columns, tests look for whole ones."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def lesson():
    return load_script("01_autotokenizer_automodel")


@pytest.fixture(scope="module")
def run(lesson, tmp_path_factory):
    out = tmp_path_factory.mktemp("lesson01")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:  # two threads: what a 2-core CI machine offers (no timing is asserted)
        with contextlib.redirect_stdout(printed):
            code = lesson.main(["--quick", "--source", "bundled", "--threads", "2", "--output-dir", str(out),
                                "--text", USER_TEXT])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return code, out, report, printed.getvalue()


def ratio_text(row: dict) -> str:
    """A speed-up as its table cell prints it."""
    return ratio_cell(row["speedup"], row["speedup_low"], row["speedup_high"])


def test_run_succeeds_with_every_section(run, lesson):
    code, out, report, printed = run
    for section in (lesson.tokenizer_section, lesson.automodel_section, lesson.pipeline_section,
                    lesson.manual_vs_pipeline_section, lesson.custom_pipelines_section):
        assert section.__doc__.splitlines()[0] in printed  # each section's why is its docstring
    assert code == 0
    assert report["failures"] == {}
    assert list(report["sections"]) == [S1, S2, S3, S4, S5]
    assert (out / "report.md").read_text(encoding="utf-8").count("## ") >= 5
    assert (out / "results.csv").is_file()
    assert {m["role"] for m in report["models"]} == {"encoder", "classifier", "decoder", "seq2seq"}
    assert printed.count("[model] role=encoder all-MiniLM-L6-v2 source=bundled |") >= 1  # provenance still printed
    assert "[model] role=seq2seq t5-small source=twin |" in printed
    assert "other processes" not in printed  # the old unmeasured excuse for a slow batched call is gone
    assert max(len(line) for line in printed.splitlines()) <= 120


def test_timing_tables_show_medians_ratio_and_verdict_only(run):
    printed = run[3]
    headers = [line.split() for line in printed.splitlines() if line.startswith("workload ")]
    assert len(headers) == 5  # tokenising, three batch sizes, tokenising before the model
    assert all(header == ["workload", "p50_ms", "items_per_s", "speedup", "verdict"] for header in headers)
    for hand_built in ("iqr_ms", "speedup_low", "ms_per_text"):  # they live in results.csv
        assert hand_built not in printed


def test_tokenizer_section_reports_losses_and_truncation(run):
    printed = run[3]
    section = run[2]["sections"][S1]
    cases = {row["case"]: row for row in section["round_trip"]}
    assert cases["Empty string"]["exact"] and cases["Empty string"]["tokens"] == 2  # [CLS] [SEP]
    assert "accents stripped" in cases["Turkish"]["lost"] and cases["Turkish"]["same_after_norm"]
    assert not cases["Turkish"]["exact"]
    assert "[UNK]" in cases["Emoji"]["lost"] and not cases["Emoji"]["same_after_norm"]
    over = cases["Over-long"]
    assert over["tokens"] > 512 and over["kept"] == section["max_tokens"] == 512 and "truncated" in over["lost"]
    assert cases["--text 1"]["chars"] == len(USER_TEXT) and cases["--text 1"]["kept"] == cases["--text 1"]["tokens"]
    assert section["padded_batch_shape"] == [3, 12]
    assert "111110000000" in printed and "(19 tokens, truncated)" in printed  # the mask row and the cut row
    assert section["walkthrough"]["input_ids"][0] == 101 and section["walkthrough"]["input_ids"][-1] == 102
    assert "istanbul=İstanbul" in printed  # offsets point back at the original, un-normalised characters


def test_tokenisation_throughput_is_one_table_against_one_baseline(run):
    _, _, report, printed = run
    section = report["sections"][S1]
    rows = {row["workload"]: row for row in section["throughput"]}
    assert list(rows) == ["1,000 single calls", "one batched call", "one batched call, padded tensor"]
    for row in rows.values():
        assert ROW_KEYS <= set(row) and row["p50_ms"] > 0 and row["runs"] >= 3
        assert row["items_per_s"] == pytest.approx(1000 / (row["p50_ms"] / 1e3))  # throughput from the median
    assert rows["1,000 single calls"]["verdict"] == "baseline" and rows["1,000 single calls"]["speedup"] == 1.0
    for name in ("one batched call", "one batched call, padded tensor"):
        row = rows[name]
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
        assert row["verdict"] == verdict_of(row["speedup_low"], row["speedup_high"])
        assert printed.count(ratio_text(row)) == 1  # each ratio stated once, in the table
    assert rows["one batched call"]["verdict"] == section["batched_verdict"]
    assert "as fast as one batched call" not in printed  # no second, unnamed baseline
    why = "Why: one call into Rust instead of 1,000"
    assert (why in flat(printed)) == (section["batched_verdict"] == "faster")  # the reason only follows "faster"


def test_similarity_orders_related_above_unrelated(run):
    section = run[2]["sections"][S2]
    assert section["hidden_shape"][0] == 5 and section["hidden_shape"][2] == 384  # 4 built-in + 1 user text
    matrix = torch.tensor(section["similarity"])
    assert torch.allclose(matrix.diagonal(), torch.ones(5), atol=1e-5)
    assert torch.allclose(matrix, matrix.T, atol=1e-6)
    assert section["ordering_ok"] and section["related_min"] > section["unrelated_max"] + 0.2
    assert section["mask_effect_max_abs"] > 0.01  # forgetting the mask really changes padded embeddings
    assert f"at least {section['related_min'] - section['unrelated_max']:.3f}" in run[3]


def test_pipeline_section(run):
    printed = run[3]
    section = run[2]["sections"][S3]
    assert section["feature_shape"][0] == 1 and section["feature_shape"][2] == 384
    assert section["padded_rows"][0] == section["padded_rows"][1] > section["own_tokens"][0]
    assert section["classifier_source"] == "bundled" and "(stand-in:" in printed  # never passed off as fine-tuned
    assert section["sentiment_correct"] == section["sentiment_checked"] == 4
    assert section["sampling_reproducible"]
    assert section["generation_meaningful"] and all(row["continuation"] for row in section["generation"])
    assert "(02 times generation)" in printed and "04 measures generation" not in printed


def test_manual_and_pipeline_agree_and_are_timed(run):
    _, _, report, printed = run
    section = report["sections"][S4]
    assert section["texts_compared"] == 13  # 12 SENTENCES + the user's text
    assert 0 <= section["embedding_max_abs_diff"] <= section["tolerance"] <= 1e-4
    assert section["labels_agree"] and set(section["labels"]) <= {"POSITIVE", "NEGATIVE"}
    assert {(row["batch"], row["workload"]) for row in section["timings"]} == {
        (b, p) for b in (1, 8, 32) for p in ("manual", "pipeline")}
    for row in section["timings"]:
        assert ROW_KEYS <= set(row) and row["p50_ms"] > 0 and row["runs"] >= 3
        assert row["items_per_s"] == pytest.approx(row["batch"] / (row["p50_ms"] / 1e3))
        if row["workload"] == "manual":
            assert row["verdict"] == "baseline"
            continue
        assert row["verdict"] == verdict_of(row["speedup_low"], row["speedup_high"])
        assert section["pipeline_ratio"][str(row["batch"])] == row["speedup"]  # = manual time / pipeline time
        assert printed.count(ratio_text(row)) == 1  # stated once: no verdict sentence repeats the table
    pipe = {row["batch"]: row for row in section["timings"] if row["workload"] == "pipeline"}
    claimed = "a fixed per-call cost weighs most when the forward pass is short" in flat(printed)
    assert claimed == section["cost_shrinks"] == (
        pipe[1]["verdict"] == "slower" and pipe[1]["speedup_high"] < pipe[32]["speedup_low"])
    parts = {row["workload"]: row for row in section["tokenising_parts"]}
    assert list(parts) == ["one batched call", "per text + collate"]
    assert printed.count(ratio_text(parts["per text + collate"])) == 1
    assert section["tokenising_explains_ms"] == pytest.approx(
        parts["per text + collate"]["p50_ms"] - parts["one batched call"]["p50_ms"])
    low, high = section["rest_interval_ms"]  # the paired whole-call interval less what tokenising explains
    assert low <= high
    assert ("within this run's noise" in printed) == (low <= 0 <= high)


def test_chart_title_groups_batch_sizes_by_verdict(lesson):
    title = lesson.pipeline_finding({1: "slower", 8: "inconclusive", 32: "slower"})
    assert title == "slower at batch 1, 32; inconclusive at batch 8"
    assert lesson.pipeline_finding({1: "same", 8: "same"}) == "no measurable difference at batch 1, 8"


def test_custom_pipelines_section(run, lesson):
    _, _, report, printed = run
    section = report["sections"][S5]
    assert section["ordering_ok"] and section["max_diff_vs_manual"] < 1e-5
    _, task, _ = PIPELINE_REGISTRY.check_task("sentence-similarity")  # registered by the lesson's own section 5
    assert task["impl"] is lesson.SentenceSimilarityPipeline and task["pt"] == (AutoModel,)
    t2t = section["text_to_text"]
    assert t2t["source"] == "twin" and t2t["meaningful"] is False
    assert t2t["output_tokens"] == lesson.QUICK.text_to_text_tokens + 1  # decoder start token + new tokens
    assert t2t["new_tokens"] == lesson.QUICK.text_to_text_tokens  # what the lesson prints beside max_new_tokens
    assert f"{lesson.QUICK.text_to_text_tokens} new tokens (max_new_tokens={lesson.QUICK.text_to_text_tokens})" \
        in printed
    for name in ("sentence-similarity", "text-to-text"):
        stages = {row["stage"]: row for row in section["stages"] if row["pipeline"] == name}
        assert set(stages) == {"preprocess", "_forward", "postprocess", "whole call"}
        assert all(ROW_KEYS <= set(row) and row["p50_ms"] > 0 for row in stages.values())
        # shares of the three stages' summed medians: they add up to 100%, none above it
        parts = [stages[stage] for stage in ("preprocess", "_forward", "postprocess")]
        assert stages["whole call"]["share_pct"] is None
        assert sum(row["share_pct"] for row in parts) == pytest.approx(100.0)
        assert stages["_forward"]["share_pct"] == pytest.approx(
            100 * stages["_forward"]["p50_ms"] / sum(row["p50_ms"] for row in parts))
    for glue in section["glue"]:  # the glue is claimed only when its round-by-round interval lies above zero
        assert flat(glue) in flat(printed)
        low = float(re.search(r"\[(-?[\d.,]+) to", glue).group(1).replace(",", ""))
        assert ("none measurable" in glue) == (low <= 0)
    assert "came out below the sum" not in printed  # no comparison the printed precision cannot support


def test_twin_text_is_never_shown_as_meaningful(run):
    printed = run[3]
    assert "summary:" not in printed and "its text is noise and is not shown" in flat(printed)


def test_settings_keep_full_and_quick_side_by_side(lesson):
    assert lesson.FULL.generation_tokens > lesson.QUICK.generation_tokens
    assert lesson.FULL.text_to_text_tokens > lesson.QUICK.text_to_text_tokens
    with pytest.raises(AttributeError):
        lesson.QUICK.warmup = 0  # frozen: a section cannot change the run's settings


def test_non_utf8_file_is_a_clear_error(lesson, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Günaydın, çay?\n".encode("latin-1", errors="replace") + b"\xff\xfe bad\n")
    with pytest.raises(UserError, match="not UTF-8"):
        lesson.main(["--quick", "--text-file", str(bad), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lesson.main, ["--quick", "--text-file", str(bad), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("argv_kind", ["empty file", "blank --text", "missing file"])
def test_empty_or_missing_input_is_a_clear_error(lesson, tmp_path, argv_kind):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n", encoding="utf-8")
    argv = {"empty file": ["--text-file", str(empty)], "blank --text": ["--text", "  "],
            "missing file": ["--text-file", str(tmp_path / "nope.txt")]}[argv_kind]
    with pytest.raises(UserError, match="no text|no such file"):
        lesson.main(["--quick", *argv, "--output-dir", str(tmp_path / "out")])


def test_100k_character_text_is_truncated_and_reported(lesson, tmp_path, capsys):
    from common import models

    long_text = ("Tokenizers split long documents into many pieces. " * 2_000)[:99_999] + "."
    path = tmp_path / "long.txt"
    path.write_text(f"{long_text}\nshort line\n", encoding="utf-8")
    texts = cli.read_user_texts(argparse.Namespace(text=None, text_file=path))
    assert [len(t) for t in texts] == [100_000, len("short line")]
    loaded = models.load_model("encoder", source="bundled", verbose=False)
    rows = common_texts.report_truncation(loaded.tokenizer, texts, 512)
    assert len(rows) == 1 and rows[0]["chars"] == 100_000 and rows[0]["kept"] == 512 and rows[0]["tokens"] > 10_000
    printed = capsys.readouterr().out
    assert "[truncated]" in printed and "100,000 chars" in printed and "short line" not in printed


def test_a_failing_section_is_recorded_and_exits_nonzero(lesson, tmp_path, monkeypatch):
    def fine(*args):
        """Stands in for a section that works."""
        return {"ok": True}

    def broken(*args):
        """Stands in for a section that raises."""
        raise RuntimeError("boom")

    for name in ("tokenizer_section", "automodel_section", "pipeline_section", "manual_vs_pipeline_section",
                 "custom_pipelines_section"):
        monkeypatch.setattr(lesson, name, fine)
    monkeypatch.setattr(lesson, "pipeline_section", broken)
    code = lesson.main(["--quick", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert code == 1
    assert report["failures"] == {S3: "RuntimeError: boom"}
    assert set(report["sections"]) == {S1, S2, S4, S5}
