"""Tests for 03_cpu_gpu_optimization.py: one --quick run end to end (every table's verdict checked against its
interval, every bar against its interval), the taught calls written in the lesson, --only, and the CUDA paths (skipped
with a reason where there is no CUDA GPU)."""
from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import cuda_test, is_png, verdict_of

from common.report import interval_status

lesson = importlib.import_module("03_cpu_gpu_optimization")  # registered in sys.modules, as dataclasses need
SOURCE = Path(lesson.__file__).read_text(encoding="utf-8")
TITLES = [title for title, _ in lesson.SECTIONS.values()]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole lesson once with --quick on two threads: exit code, report.json, the output folder, what it printed."""
    out = tmp_path_factory.mktemp("lesson03")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:  # two threads: what a 2-core CI machine offers (no timing is asserted)
        with contextlib.redirect_stdout(printed):
            code = lesson.main(["--quick", "--source", "bundled", "--threads", "2", "--output-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return code, report, out, printed.getvalue()


def rows_of(report: dict, title: str) -> list[dict]:
    return [row for row in report["rows"] if row["section"] == title]


def joined(text: str) -> str:
    """Wrapped lines joined back into one: the tests look for whole sentences."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------- the lesson's shape


def test_the_taught_calls_are_written_in_the_lesson_and_no_section_reads_another():
    for call in ("set_num_threads(", "quantize_dynamic(", "BitsAndBytesConfig(", "no_grad()", "inference_mode()",
                 "autocast(", "gc.collect()", "empty_cache()", "torch.compile(", "attn_implementation=", ".pad(",
                 "device_map=", "torch.cuda.is_available()", "torch.backends.mps.is_available()"):
        assert call in SOURCE, call
    assert "results.get(" not in SOURCE and len(SOURCE.splitlines()) <= 850
    for _, section in lesson.SECTIONS.values():  # a section takes the context and the settings, nothing else
        assert list(inspect.signature(section).parameters) == ["ctx", "s"], section.__name__
        assert 1 <= len(inspect.cleandoc(section.__doc__).splitlines()) <= 3, section.__name__  # the why


def test_each_taught_call_sits_in_the_section_that_teaches_it():
    tree = ast.parse(SOURCE)
    bodies = {node.name: ast.get_source_segment(SOURCE, node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    where = {"threads_section": "set_num_threads(", "quantization_section": "quantize_dynamic(",
             "grad_section": "torch.no_grad()", "precision_section": "torch.autocast(",
             "batching_section": "tokenizer.pad(", "attention_section": "torch.compile(",
             "memory_section": "gc.collect()", "device_section": "torch.backends.mps.is_available()"}
    for function, call in where.items():
        assert call in bodies[function], (function, call)


# ------------------------------------------------------------------------------------------- end to end


def test_quick_run_completes_every_section_with_its_why(quick_run):
    code, report, _, printed = quick_run
    assert report["failures"] == {} and code == 0
    assert list(report["sections"]) == TITLES + ["Summary"]
    for _, section in lesson.SECTIONS.values():
        assert joined(inspect.cleandoc(section.__doc__)) in joined(printed), section.__name__
    assert max(len(line) for line in printed.splitlines()) <= 120


def test_every_chart_is_a_png(quick_run):
    _, report, out, _ = quick_run
    names = sorted(Path(path).name for path in report["charts"])
    assert names == ["batching.png", "quantization.png", "threads.png"]
    for name in names:
        assert is_png(out / name), name


def test_every_table_row_is_its_own_median_and_its_verdict_follows_its_interval(quick_run):
    _, report, _, _ = quick_run
    compared = [row for row in report["rows"] if "verdict" in row]
    assert {row["section"] for row in compared} >= {TITLES[1], TITLES[2], TITLES[3], TITLES[4], TITLES[5], TITLES[6]}
    for row in compared:
        assert row["ci95_low_ms"] <= row["p50_ms"] <= row["ci95_high_ms"], row  # a median inside its own interval
        assert row["items_per_s"] == pytest.approx(
            (row["items_per_s"] * row["p50_ms"] / 1e3) / (row["p50_ms"] / 1e3))
        if row["verdict"] == "baseline":
            assert row["speedup"] == pytest.approx(1.0)
        else:
            assert row["verdict"] == verdict_of(row["speedup_low"], row["speedup_high"]), row
            assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"], row
            assert row["runs"] >= lesson.QUICK.rounds


def test_every_bar_follows_its_interval_and_is_printed_once(quick_run):
    _, report, _, printed = quick_run
    bars = {bar["bar"]: bar for bar in report["bars"]}
    assert set(bars) == {"dynamic int8 vs fp32", "length-sorted dynamic vs pad-to-max"}
    for bar in bars.values():
        assert printed.count(f"] {bar['bar']}:") == 1, bar["bar"]
        if bar["value"] is not None:
            assert bar["status"] == interval_status(bar["low"], bar["high"], bar["minimum"]), bar
    assert bars["length-sorted dynamic vs pad-to-max"]["minimum"] == lesson.SORTED_TARGET


def test_threads_are_restored_and_the_advice_follows_the_verdict(quick_run):
    _, report, _, _ = quick_run
    threads = report["sections"][TITLES[1]]
    assert threads["restored"] == 2  # what --threads 2 set before the section changed it
    rows = rows_of(report, TITLES[1])
    for size, best in threads["best"].items():
        batch = [row for row in rows if row["workload"].endswith(("thread", "threads"))
                 and row["items_per_s"] and rows.index(row) // (len(rows) // 2) == (size != "1")]
        faster = [row for row in batch if row["verdict"] == "faster"]
        chosen = max(faster, key=lambda r: r["speedup"])["workload"] if faster else lesson.thread_label(2)
        assert lesson.thread_label(best) == chosen


def test_only_grad_enabled_keeps_activations(quick_run):
    _, report, _, _ = quick_run
    kept = {row["workload"]: row["kept_mib"] for row in rows_of(report, TITLES[2])}
    assert kept["grad enabled"] > 1
    assert kept["torch.no_grad()"] == 0 and kept["torch.inference_mode()"] == 0


def test_quantization_keeps_the_fewest_sensitive_layers_that_reach_the_bar(quick_run):
    _, report, _, _ = quick_run
    rows = {row["workload"]: row for row in rows_of(report, TITLES[4])}
    assert {"fp32", "dynamic int8", "int8 per-channel"} <= set(rows)
    mixed = [name for name in rows if name.startswith("int8, ")]
    assert len(mixed) == 1
    kept = int(mixed[0].split()[1])
    assert kept == len(report["sections"][TITLES[4]]["kept_fp32"]) and kept in lesson.KEEP_LADDER
    assert rows[mixed[0]]["size_pct"] > rows["dynamic int8"]["size_pct"]  # fp32 layers take more room than int8
    assert rows["fp32"]["cosine_min"] == pytest.approx(1.0)
    bar = next(bar for bar in report["bars"] if bar["bar"] == "dynamic int8 vs fp32")
    if lesson.keeps_fidelity(rows[mixed[0]]):  # the bar is on the faithful variant, or a MISS on fidelity
        assert mixed[0] in bar["measured"]
    else:
        assert bar["status"] == "MISS"


def test_batching_waste_falls_with_dynamic_padding_and_sorting_and_changes_no_output(quick_run):
    _, report, _, _ = quick_run
    waste = {(row["strategy"], row["batch"]): row["waste_pct"] for row in rows_of(report, TITLES[5])}
    for size in lesson.QUICK.batch_sizes[1:]:
        assert waste[("dynamic + sorted", size)] <= waste[("dynamic", size)] <= waste[("pad to max_length", size)]
    assert waste[("dynamic", 1)] == 0
    assert report["sections"][TITLES[5]]["worst_cosine"] > 0.9999


def test_a_peak_is_a_ceiling_nothing_measured_exceeds(quick_run):
    _, report, _, _ = quick_run
    loads = [row for row in rows_of(report, "memory") if "load" in row]
    assert len(loads) == 3
    for row in loads:
        assert row["peak_mib"] >= row["resident_after_forward_mib"], row
    bf16 = next(row for row in loads if "bfloat16" in row["load"] or "float16" in row["load"])
    assert bf16["weights_mib"] == pytest.approx(loads[0]["weights_mib"] / 2, rel=0.01)


def test_compile_and_gpu_memory_are_skipped_with_their_reasons(quick_run):
    _, report, _, printed = quick_run
    assert report["skipped"]["torch.compile"].startswith("--quick")
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in report["skipped"]["GPU memory"]


def test_the_summary_names_each_sections_finding_and_points_to_04(quick_run):
    _, report, _, printed = quick_run
    summary = report["sections"]["Summary"]
    for title in TITLES[1:8]:
        assert report["sections"][title]["choice"] in summary, title
    assert "04" in summary and joined(summary) in joined(printed)


def test_settings_side_by_side_and_quick_is_smaller():
    assert lesson.FULL.rounds >= 5 and lesson.QUICK.rounds >= 3
    assert lesson.QUICK.corpus_size < lesson.FULL.corpus_size
    with pytest.raises(AttributeError):
        lesson.FULL.rounds = 1  # frozen: one run cannot change its settings half-way


# ----------------------------------------------------------------------------------------------- --only


def test_only_rejects_an_unknown_section(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lesson.cli.run(lesson.main, ["--only", "threads,warp-drive"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "warp-drive" in error and "batching" in error and "Traceback" not in error


def test_each_section_runs_alone(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        code = lesson.main(["--quick", "--source", "bundled", "--only", "grad", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert code == 0 and list(report["sections"]) == [TITLES[2], "Summary"]


# ------------------------------------------------------------------------------------------------- CUDA


@cuda_test
def test_cuda_sections_run_on_this_gpu(tmp_path):
    code = lesson.main(["--quick", "--source", "bundled", "--device", "cuda", "--only",
                        "device,precision,quantization,memory,gpu-memory", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert code == 0 and report["failures"] == {}
    assert "CPU-only" in report["skipped"]["dynamic int8"]
    devices = [row["workload"] for row in rows_of(report, TITLES[0])]
    assert devices == ["cpu", f"cuda:{torch.cuda.current_device()}"] or devices == ["cpu", "cuda"]
    gpu = rows_of(report, "gpu memory")
    weights = {row["precision"]: row["weights_mib"] for row in gpu}
    assert weights["fp16 weights"] == pytest.approx(weights["fp32"] / 2, rel=0.05)
    assert weights["bitsandbytes 4-bit nf4"] < weights["bitsandbytes 8-bit"] < weights["fp32"]
