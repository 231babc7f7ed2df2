"""04_performance_measurement.py: one --quick run end to end (with --compare), the pure functions, bad input, Ctrl-C."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from common import cli, texts
from common.report import REPORT_VERSION

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ["latency_per_task", "memory_per_task", "throughput_vs_batch", "devices_side_by_side", "summary"]
TASKS = ["feature-extraction", "text-classification", "text-generation", "text-to-text"]


def load_script():
    spec = importlib.util.spec_from_file_location("performance_measurement", ROOT / "04_performance_measurement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()

# A previous report whose one shared measurement was absurdly slow with a tight CI: the run must flag it FASTER.
DEVICES_KEY = {"section": "5. Devices", "measurement": "devices: feature-extraction", "model": "all-MiniLM-L6-v2",
               "device": "cpu", "batch": script.TASK_TEXTS}
CRAFTED_PREVIOUS = {
    "report_version": REPORT_VERSION, "script": "04_performance_measurement", "created": "earlier",
    "environment": {}, "rows": [
        {**DEVICES_KEY, "p50_ms": 1e6, "ci95_low_ms": 1e6, "ci95_high_ms": 1e6},
        {**DEVICES_KEY, "measurement": "a measurement this run does not make", "p50_ms": 1.0,
         "ci95_low_ms": 1.0, "ci95_high_ms": 1.0},
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("performance")
    previous = out / "previous.json"
    previous.write_text(json.dumps(CRAFTED_PREVIOUS))
    code = script.main(["--quick", "--source", "bundled", "--output-dir", str(out / "run"),
                        "--compare", str(previous)])
    report = json.loads((out / "run" / "report.json").read_text())
    return code, out / "run", report


def test_run_succeeds_and_writes_the_three_reports(run):
    code, out, report = run
    assert code == 0, report["failures"]
    assert report["failures"] == {} and report["partial"] is False
    assert (out / "results.csv").is_file()
    markdown = (out / "report.md").read_text()
    for title in ["1. Meet the meter", "2. Model load time", "3. Task benchmarks", "4. Batch-size sweep",
                  "5. Devices", "6. The seed's table, reproduced", "7. Report and comparison"]:
        assert title in report["sections"]
        assert f"## {title}" in markdown


def test_every_chart_is_a_png_listed_in_the_report(run):
    _, out, report = run
    for name in CHARTS:
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        assert str(path) in report["charts"]


def test_meter_section_reports_overhead_and_the_timer_ratio(run):
    meter = run[2]["sections"]["1. Meet the meter"]
    assert 0 < meter["meter_overhead_us"] and meter["overhead_ok"] == (meter["meter_overhead_us"] < 50)
    assert meter["meter_over_timer"] == pytest.approx(meter["meter_median_ms"] / meter["timer_median_ms"])
    assert meter["agree_within_5pct"] == (abs(meter["meter_over_timer"] - 1) <= 0.05)


def test_percentiles_and_intervals_are_ordered_in_every_row(run):
    rows = [row for row in run[2]["rows"] if row["runs"] > 1]
    assert rows
    for row in rows:
        assert row["ci95_low_ms"] <= row["p50_ms"] <= row["ci95_high_ms"], row["measurement"]
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row["measurement"]


def test_tasks_count_real_tokens_and_keep_their_samples(run):
    from transformers import AutoTokenizer

    from common import models

    section = run[2]["sections"]["3. Task benchmarks"]
    tasks = {task["task"]: task for task in section["tasks"]}
    assert sorted(tasks) == sorted(TASKS)
    for name, task in tasks.items():
        assert len(section["latency_samples_ms"][name]) == task["runs"]
    tokenizer = AutoTokenizer.from_pretrained(models.bundled_folder("all-MiniLM-L6-v2"))
    batch = texts.repeated_sentences(script.TASK_TEXTS)
    unpadded = sum(len(tokenizer(text)["input_ids"]) for text in batch)
    padded = len(batch) * max(len(tokenizer(text)["input_ids"]) for text in batch)
    assert unpadded < padded  # the check below could not tell the two apart otherwise
    encoder = tasks["feature-extraction"]
    assert encoder["tokens_per_s"] / encoder["texts_per_s"] == pytest.approx(unpadded / len(batch))
    generation = tasks["text-generation"]
    assert generation["tokens_per_s"] / generation["texts_per_s"] == pytest.approx(script.QUICK_NEW_TOKENS)
    assert section["generation"]["new_tokens"] == script.QUICK_NEW_TOKENS


def test_sweep_knee_matches_the_pure_function(run):
    sweeps = run[2]["sections"]["4. Batch-size sweep"]
    assert sorted(sweeps) == ["classifier", "encoder"]
    for sweep in sweeps.values():
        batches = [row["batch"] for row in sweep["table"]]
        assert batches == script.QUICK_SWEEP_BATCH_SIZES
        assert sweep["knee_batch"] == script.find_knee(batches, [row["texts_per_s"] for row in sweep["table"]])


def test_devices_and_seed_table_cover_what_this_machine_has(run):
    report = run[2]
    devices = report["sections"]["5. Devices"]
    assert devices[0]["device"] == "cpu" and devices[0]["speedup_vs_cpu"] == pytest.approx(1.0)
    seed = report["sections"]["6. The seed's table, reproduced"]
    assert seed["input_shape"] == f"[1, {script.SEED_INPUT_TOKENS}]"
    assert [(row["model"], row["device"], row["seed_time_s"]) for row in seed["rows"]] == \
        [(entry["model"], entry["device"], entry["time_s"]) for entry in script.SEED_TABLE]
    for row in seed["rows"]:
        if row["device"] == "CPU":
            assert row["ours_over_seed_time"] == pytest.approx(row["ours_time_s"] / row["seed_time_s"])
    if not torch.cuda.is_available():
        assert len(devices) == 1 and "device cuda" in report["skipped"]
        assert all(row["ours_time_s"] is None for row in seed["rows"] if row["device"] == "GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_rows_are_measured_with_cuda_memory(run):
    report = run[2]
    devices = {row["device"]: row for row in report["sections"]["5. Devices"]}
    assert devices["cuda"]["cuda_alloc_mib"] > 0
    for row in report["sections"]["6. The seed's table, reproduced"]["rows"]:
        if row["device"] == "GPU":
            assert row["ours_time_s"] > 0 and row["memory_measured_as"] == "CUDA peak reserved"


def test_loads_have_cold_and_warm_rows(run):
    loads = run[2]["sections"]["2. Model load time"]
    assert len(loads) == len(script.QUICK_LOAD_ROLES)
    for load in loads:
        assert load["cold_s"] > 0 and load["warm_s"] > 0
        assert load["cold_over_warm"] == pytest.approx(load["cold_s"] / load["warm_s"])


def test_compare_flag_in_the_run_itself(run):
    result = run[2]["sections"]["7. Report and comparison"]
    assert result["shared"] == 1 and result["flagged"] == 1
    (row,) = result["comparison"]
    assert row["measurement"] == DEVICES_KEY["measurement"] and row["verdict"] == "FASTER"


def test_csv_loads_back_with_the_json_numbers(run):
    _, out, report = run
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(report["rows"])
    for json_row, csv_row in zip(report["rows"], csv_rows):
        for key, value in json_row.items():
            if value is None:
                assert csv_row[key] == ""
            elif isinstance(value, bool):
                assert csv_row[key] == str(value)
            elif isinstance(value, (int, float)):
                assert float(csv_row[key]) == value, key
            else:
                assert csv_row[key] == value


def test_compare_flags_exactly_the_rows_made_slower(run):
    rows = run[2]["rows"]
    slower = copy.deepcopy(rows)
    edited = [i for i, row in enumerate(slower) if row.get("ci95_low_ms")][::7][:3]  # spread over sections
    for i in edited:
        row = slower[i]
        factor = 2 * row["ci95_high_ms"] / row["ci95_low_ms"]  # big enough that the CIs cannot overlap
        for key in ("p50_ms", "p90_ms", "p99_ms", "ci95_low_ms", "ci95_high_ms"):
            row[key] *= factor
    compared = script.compare_measurements(rows, slower)
    assert len(compared) == sum(1 for row in rows if row.get("p50_ms"))
    flagged = [(row["section"], row["measurement"], row["batch"]) for row in compared if row["flagged"]]
    assert flagged == [(slower[i]["section"], slower[i]["measurement"], slower[i]["batch"]) for i in edited]
    assert {row["verdict"] for row in compared if row["flagged"]} == {"SLOWER"}
    for row in compared:
        if not row["flagged"]:
            assert row["ratio"] == pytest.approx(1.0)


def test_find_knee_on_synthetic_curves():
    batches = [1, 2, 4, 8, 16, 32, 64]
    assert script.find_knee(batches, [1, 2, 4, 8, 8, 8, 8]) == 8  # linear scaling, then flat
    assert script.find_knee(batches, [10, 19, 24, 25, 25.5, 25.6, 25.7]) == 4  # early saturation
    assert script.find_knee(batches, [1, 2, 4, 8, 9, 6, 3]) == 16  # a peak: the best batch is the bend
    assert script.find_knee(batches, batches) is None  # still doubling: no knee yet
    assert script.find_knee(batches, [5] * 7) is None  # flat: nothing bends
    assert script.find_knee([1, 2], [1, 2]) is None  # too few points


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({**CRAFTED_PREVIOUS, "report_version": REPORT_VERSION + 1}), "incompatible"),
    (json.dumps({**CRAFTED_PREVIOUS, "script": "01_autotokenizer_automodel"}), "not a report.json"),
    (json.dumps([1, 2, 3]), "not a report.json"),
])
def test_bad_compare_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "previous.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(script.main, ["--quick", "--output-dir", str(tmp_path / "out"), "--compare", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "out").exists()  # refused before anything was measured


def test_ctrl_c_writes_a_partial_report(tmp_path, monkeypatch):
    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "meet_the_meter_section", lambda ctx: {"measured": 1.5})
    monkeypatch.setattr(script, "load_time_section", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(script.main, ["--quick", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 130
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partial"] is True
    assert report["sections"] == {"1. Meet the meter": {"measured": 1.5}}
    assert "2. Model load time" in report["failures"]
    assert "Partial report" in (tmp_path / "report.md").read_text()
