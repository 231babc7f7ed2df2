"""Tables, JSON conversion, atomic writes and the section runner that keeps results when a section fails."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from common import report
from common.errors import UserError
from common.report import Report, atomic_write, format_table, to_jsonable


def test_atomic_write_leaves_old_file_and_no_temp_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, "new content")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write(target, "first")
    atomic_write(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["a.txt"]


def test_to_jsonable_handles_numpy_torch_dataclasses_and_nan():
    @dataclass
    class Point:
        x: float
        tags: tuple

    converted = to_jsonable({"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": Point(float("nan"), ("t",)),
                             "d": torch.float16, "e": torch.Size([2, 3])})
    assert converted == {"a": 1.5, "b": [1, 2], "c": {"x": None, "tags": ["t"]}, "d": "torch.float16", "e": [2, 3]}
    json.dumps(converted, allow_nan=False)


def test_format_table_aligns_numbers_right_and_text_left():
    text = format_table([{"model": "bert", "ms": 12.345}, {"model": "distilbert", "ms": 1234.5}])
    lines = text.splitlines()
    assert lines[0].startswith("model") and lines[0].endswith("ms")
    assert lines[2] == "bert" + " " * 9 + "12.3"
    assert lines[3] == "distilbert  1,234"



def full_width_rows() -> list[dict]:
    """Rows as a lesson's widest timing table has them: long labels, every record key, a noisy slow workload."""
    base = {"model": "SmolLM2-135M-Instruct (twin)", "batch": 32, "seq_len": 512}
    return [
        {**base, "workload": "whole model in memory", "p50_ms": 1234.5678, "iqr_ms": 12.0, "runs": 5,
         "items_per_s": 25.9, "tokens_per_s": 13254.0, "noisy": False, "speedup": 1.0, "speedup_low": 1.0,
         "speedup_high": 1.0, "verdict": "baseline"},
        {**base, "workload": "length-sorted dynamic padding", "p50_ms": 41.2371, "iqr_ms": 4.95, "runs": 1000,
         "items_per_s": 77612.25, "tokens_per_s": 1234567.8, "noisy": True, "speedup": 12.04, "speedup_low": 10.91,
         "speedup_high": 13.16, "verdict": "inconclusive", "sentence": "x" * 300},
    ]


def test_console_table_keeps_record_keys_out_and_a_full_width_row_fits_120_columns():
    rows = full_width_rows()
    columns = ["batch", "workload", "p50_ms", "iqr_ms", "runs", "items_per_s", "tokens_per_s", "noisy", "speedup",
               "speedup_low", "speedup_high", "verdict", "sentence"]  # a batch label and two throughputs: the widest
    lines = format_table(rows, columns).splitlines()
    assert max(len(line) for line in lines) <= 120
    header = lines[0].split()
    assert header == ["batch", "workload", "p50_ms", "items_per_s", "tokens_per_s", "speedup", "verdict"]
    assert "41.2 (! 12%)" in lines[3]  # noise marked in the cell: IQR 4.95 of 41.2 ms
    assert "12.04x [10.91-13.16]" in lines[3] and lines[3].endswith("inconclusive")
    assert " 1.00x" not in lines[2] and "1,235" in lines[2] and "(!" not in lines[2]  # baseline: no 1 1 1
    assert lines[2].endswith("baseline")


def test_record_keys_stay_in_the_csv(tmp_path):
    rep = Report("05_example", tmp_path, {"device": "cpu"})
    rep.add_rows("s", full_width_rows())
    rep.write()
    with open(tmp_path / "results.csv", newline="") as stream:
        first = next(csv.DictReader(stream))
    assert {"iqr_ms", "runs", "speedup_low", "speedup_high", "noisy"} <= first.keys()
    assert first["speedup_low"] == "1.0" and first["runs"] == "5"


def test_evidence_sentences_wrap_at_100_columns(capsys):
    report.say("word " * 60 + "end")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and max(len(line) for line in lines) <= report.WRAP
    assert lines[1].startswith("  word") and lines[-1].endswith("end")

def test_failed_section_is_recorded_and_the_next_section_still_runs(tmp_path, capsys):
    rep = Report("05_example", tmp_path, {"device": "cpu"})
    rep.run_section("1. works", "why", lambda: {"speedup": 2.0, "table": [{"a": 1}]})
    rep.run_section("2. breaks", "why", lambda: 1 / 0)
    rep.run_section("3. user error", "why", lambda: (_ for _ in ()).throw(UserError("bad input")))
    rep.run_section("4. works too", "why", lambda: [{"b": 2}])
    rep.add_rows("1. works", [{"name": "x", "p50_ms": 1.25}])
    assert rep.finish() == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["sections"]["1. works"]["speedup"] == 2.0
    assert data["sections"]["4. works too"] == [{"b": 2}]
    assert "ZeroDivisionError" in data["failures"]["2. breaks"]
    assert data["failures"]["3. user error"] == "bad input"
    assert data["environment"] == {"device": "cpu"}
    markdown = (tmp_path / "report.md").read_text()
    assert "## 1. works" in markdown and "| a |" in markdown and "## Failed sections" in markdown
    with open(tmp_path / "results.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"section": "1. works", "name": "x", "p50_ms": "1.25"}]


def test_interrupted_section_writes_a_partial_report(tmp_path):
    rep = Report("05_example", tmp_path, {})
    rep.run_section("1. done", "why", lambda: {"value": 1})

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rep.run_section("2. interrupted", "why", interrupted)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is True
    assert data["sections"] == {"1. done": {"value": 1}}
    assert "Partial report" in (tmp_path / "report.md").read_text()


def test_each_section_leaves_a_checkpoint_that_finish_completes(tmp_path):
    rep = Report("05_example", tmp_path, {})
    rep.run_section("1. done", "why", lambda: {"value": 1})
    rep.run_section("2. broken", "why", lambda: 1 / 0)
    data = json.loads((tmp_path / "report.json").read_text())  # what a SIGKILL here would leave
    assert data["partial"] is True and data["interrupted"] == "killed or still running"
    assert data["sections"] == {"1. done": {"value": 1}}
    assert data["failures"] == {"2. broken": "ZeroDivisionError: division by zero"}
    assert rep.finish() == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["partial"] is False and data["interrupted"] is None


def test_successful_run_exits_zero(tmp_path):
    rep = Report("05_example", tmp_path, {})
    rep.run_section("1. fine", "why", lambda: {"x": 1})
    assert rep.finish() == 0
    assert not (tmp_path / "results.csv").exists()  # no rows, no CSV


def test_bar_status_follows_the_whole_interval(capsys):
    assert report.interval_status(2.1, 2.6, 2.0) == "PASS"
    assert report.interval_status(1.2, 1.9, 2.0) == "MISS"
    assert report.interval_status(0.75, 1.06, 1.0) == "INCONCLUSIVE"  # the estimate 0.90x alone would say MISS
    bar = report.ratio_bar("x", ">= 1.0x", "0.90x", (0.90, 0.75, 1.06), 5, 1.0)
    assert bar["status"] == "INCONCLUSIVE" and "rounds would tell whether it clears its target" in bar["measured"]
    assert (bar["low"], bar["high"], bar["minimum"]) == (0.75, 1.06, 1.0)
    assert report.ratio_bar("x", ">= 2x", "2.5x", (2.5, 2.2, 2.8), 5, 2.0)["status"] == "PASS"
    assert report.performance_bar("x", "no target", "1.5x", 1.5, "REPORTED")["status"] == "REPORTED"
    with pytest.raises(ValueError):
        report.performance_bar("x", ">= 2x", "1.5x", 1.5, "FAIL")
    assert "[INCONCLUSIVE] x: measured 0.90x; " in capsys.readouterr().out


def test_a_share_of_a_limit_above_100_percent_is_a_broken_reference_never_a_pass(capsys):
    broken = report.limit_bar("flops", ">= 70%", "104%", (1.04, 0.98, 1.10), 5, 0.7)
    assert broken["status"] == "BROKEN REFERENCE" and "not this machine's limit" in broken["measured"]
    assert report.limit_bar("flops", ">= 70%", "85%", (0.85, 0.80, 0.90), 5, 0.7)["status"] == "PASS"
    assert report.limit_bar("flops", ">= 70%", "50%", (0.50, 0.45, 0.55), 5, 0.7)["status"] == "MISS"
    undecided = report.limit_bar("flops", ">= 70%", "72%", (0.72, 0.60, 0.80), 5, 0.7)
    assert undecided["status"] == "INCONCLUSIVE"
    assert "rounds would tell whether it clears its target" in undecided["measured"]
    assert "[BROKEN REFERENCE] flops" in capsys.readouterr().out


def test_first_line_keeps_the_type_and_the_first_line_only():
    from common.errors import first_line
    assert first_line(RuntimeError("CUDA missing\nlong trace")) == "RuntimeError: CUDA missing"
    assert first_line(ValueError()) == "ValueError: "


def paired(samples: dict[str, list[float]]):
    """A Comparison from known per-round times (seconds), as the meter would return it."""
    from common.meter import Comparison, PerformanceMeter
    meter = PerformanceMeter()
    measurements = {name: meter.measure(name, lambda: None, warmup=0, min_runs=1, max_runs=1) for name in samples}
    for name, values in samples.items():
        measurements[name] = report_measurement(measurements[name], values)
    return Comparison(measurements, [])


def report_measurement(template, values):
    import dataclasses
    from common.meter import Stats
    stats = Stats.from_samples(values)
    return dataclasses.replace(template, samples_s=values, stats=stats, items_per_s=1 / stats.median)


def test_show_prints_each_rows_own_median_and_the_ratio_once_and_records_rows_and_bar(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setattr(report, "_explained", {"timing"})  # as a lesson that taught p50 and noise itself
    rep = Report("05_example", tmp_path, {"device": "cpu"})
    base = [0.010, 0.011, 0.012, 0.010, 0.011, 0.010, 0.012]
    fast = [t / 2.5 for t in base]  # 2.5x in every round
    rows = report.show(paired({"slow": base, "fast": fast}), "slow", "two workloads", report=rep, section="demo",
                       extra={"fast": {"cosine_min": 0.97}}, columns=("cosine_min",),
                       bar=("fast enough", "fast", 2.0))
    out = capsys.readouterr().out
    by_name = {row["workload"]: row for row in rows}
    assert by_name["fast"]["p50_ms"] == pytest.approx(np.median(fast) * 1e3)  # its own median, never derived
    assert by_name["slow"]["p50_ms"] == pytest.approx(11.0)
    assert by_name["fast"]["speedup"] == pytest.approx(2.5) and by_name["fast"]["cosine_min"] == 0.97
    assert out.count("2.50x") == 1  # the table cell only: the bar under it points at it
    assert "[PASS] fast enough" in out and "speedup is how many times faster per item" in out
    assert "p50_ms is each row's own median" not in out  # the part the lesson taught is not repeated
    assert [row["section"] for row in rep.rows] == ["demo", "demo"]
    report.show(paired({"slow": base, "fast": fast}), "slow", "again")
    assert "speedup is how many times" not in capsys.readouterr().out  # once per lesson
    assert (rep.bars[0]["status"], rep.bars[0]["value"]) == ("PASS", pytest.approx(2.5))


def test_attempt_records_a_failing_item_and_goes_on(tmp_path, capsys):
    rep = Report("05_example", tmp_path, {"device": "cpu"})
    results = [rep.attempt(f"item {n}", lambda n=n: 10 // n) for n in (1, 0, 2)]
    assert results == [10, None, 5]  # the item after the failing one still ran
    assert rep.skipped == {"item 0": "ZeroDivisionError: integer division or modulo by zero"}
    assert rep.failures == {}
    assert rep.attempt("task x", lambda: int("x"), fails_run=True) is None
    assert rep.failures["task x"].startswith("ValueError: invalid literal")
    assert "[failed] task x: ValueError" in capsys.readouterr().out
    assert rep.finish() == 1  # a failed item gives exit code 1, a skipped one does not


def test_attempt_lets_ctrl_c_through(tmp_path):
    rep = Report("05_example", tmp_path, {"device": "cpu"})

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rep.attempt("item", interrupted)


def test_latex_table_escapes_labels_and_names_the_machine(tmp_path):
    rep = Report("05_example", tmp_path, {"cpu": "Xeon_8480 & co", "device": "cpu", "torch_threads": 2})
    row = {"measurement": "batch sweep: 100% _real_", "model": "m", "device": "cpu", "batch": 8, "p50_ms": 12.3456,
           "ci95_low_ms": 11.0, "ci95_high_ms": 13.52, "ci_coverage": 0.75, "items_per_s": 648.01}
    rep.add_rows("s", [row, {"measurement": "a load", "load_s": 1.0}])  # a row without an interval is left out
    rep.write()
    assert not (tmp_path / "report.tex").exists()  # only a lesson that asks for documents gets more than the three
    rep.documents = lambda data: {"report.tex": report.latex_table(data["rows"], rep.latex_caption())}
    rep.write()
    tex = (tmp_path / "report.tex").read_text()
    assert r"batch sweep: 100\% \_real\_ & m & cpu & 8 & 12.35 & [11, 13.52] & 75 & 648 \\" in tex
    assert r"Xeon\_8480 \& co" in tex and "a load" not in tex
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1


def test_parts_skipped_for_one_reason_are_recorded_each_and_printed_once(tmp_path, capsys):
    rep = Report("05_example", tmp_path, {})
    rep.skip_parts("GPU memory", ("allocator", "CUDA graphs"), "this run is on cpu")
    assert rep.skipped == {"GPU memory: allocator": "this run is on cpu",
                           "GPU memory: CUDA graphs": "this run is on cpu"}
    assert capsys.readouterr().out == "[skipped] GPU memory (allocator, CUDA graphs): this run is on cpu\n"


def test_ratio_cell_reads_the_estimate_then_its_interval():
    assert report.ratio_cell(2.044, 1.906, 2.164) == "2.04x [1.91-2.16]"
    assert report.console_cell({"speedup": 0.5, "speedup_low": 0.4, "speedup_high": 0.6}, "speedup") == \
        "0.50x [0.40-0.60]"


def test_show_leaves_an_unranked_row_without_a_ratio(tmp_path, capsys):
    base = [0.010, 0.011, 0.012]
    rows = report.show(paired({"whole": base, "first step": [t / 10 for t in base]}), "whole", "steps",
                       unranked=("first step",))
    first = next(row for row in rows if row["workload"] == "first step")
    assert (first["speedup"], first["verdict"]) == (None, "-") and first["p50_ms"] == pytest.approx(1.1)
    assert "10.00x" not in capsys.readouterr().out
