"""04_performance_measurement.py: one real `--quick --compare` run in a subprocess, the pure functions, bad input,
Ctrl-C. The comparison logic itself is tested on synthetic reports in test_runs.py."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import cli, paper, runs, texts
from common.meter import VERDICT_WORDS, verdict_of
from common.report import REPORT_VERSION
from conftest import ROOT, cuda_test, is_png, load_script


script = load_script("04_performance_measurement")
CHARTS = ["latency_per_task", "memory_per_task", "throughput_vs_batch", "notes_table", "compare"]  # + devices on a GPU
TASKS = ["feature-extraction", "text-classification", "text-generation", "text-to-text"]
SECTIONS = ["1. Meet the meter", "2. Model load time", "3. Task benchmarks", "4. Batch-size sweep", "5. Devices",
            "6. The course notes' table, reproduced", "8. Report and comparison"]
ONLY = "meter,loads,tasks,sweep,devices,seed"  # section 7, the runtime contest, has its own test file
# A previous run on a machine far faster than any this test runs on, with an older torch, whose instrument check
# failed, and whose one pipeline call took 1000 s: the run must say all of that, and withhold every verdict.
SHARED_KEY = {"section": "1. Meet the meter", "measurement": "one pipeline call", "model": "all-MiniLM-L6-v2",
              "device": "cpu", "batch": script.TASK_TEXTS}
CRAFTED_PREVIOUS = {
    "report_version": REPORT_VERSION, "script": "04_performance_measurement", "created": "earlier",
    "environment": {"torch": "1.0.0"}, "models": [],
    "calibration": {"start": {"matmul_samples_s": [1e-4] * 7}, "end": {"matmul_samples_s": [1e-4] * 7}},
    "sections": {"1. Meet the meter": {"instrument_check": "disagree", "meter_over_timer": 1.5}},
    "rows": [{**SHARED_KEY, "samples_ms": [1e6] * 5},
             {**SHARED_KEY, "measurement": "a measurement this run does not make", "samples_ms": [1.0, 2.0]}],
}
REMOVED_CLAIMS = ["sampled every 5 ms", "briefly needs more memory", "indistinguishable from noise",
                  "time and memory match the real models"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("performance")
    previous = out / "previous.json"
    previous.write_text(json.dumps(CRAFTED_PREVIOUS))
    done = subprocess.run([sys.executable, str(ROOT / "04_performance_measurement.py"), "--quick", "--source",
                           "bundled", "--output-dir", str(out / "run"), "--compare", str(previous), "--only", ONLY],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "run" / "report.json").read_text())
    return done, out / "run", report


def test_run_succeeds_and_writes_the_three_reports(run):
    done, out, report = run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["failures"] == {} and report["partial"] is False
    assert (out / "results.csv").is_file()
    for title in SECTIONS:
        assert title in report["sections"]
    assert set(report["calibration"]) == {"start", "sections", "end"}
    assert len(report["calibration"]["sections"]) == len(SECTIONS) - 1  # after each; the last is followed by "end"
    assert all(point["matmul_samples_s"] for point in report["calibration"]["sections"])


def test_every_chart_is_a_png_listed_in_the_report(run):
    _, out, report = run
    for name in CHARTS:
        assert is_png(out / f"{name}.png"), name
        assert str(out / f"{name}.png") in report["charts"]
    one_device = len(report["sections"]["5. Devices"]) == 1  # one bar says nothing: no chart, the table has it
    assert (out / "devices_side_by_side.png").exists() != one_device


def test_whys_are_the_section_docstrings_and_removed_claims_stay_gone(run):
    stdout = run[0].stdout
    assert script.load_time_section.__doc__.split("\n")[0] in stdout
    for claim in REMOVED_CLAIMS:
        assert claim not in stdout


def test_meter_section_reports_overhead_and_the_instrument_check(run):
    meter = run[2]["sections"]["1. Meet the meter"]
    assert 0 < meter["meter_overhead_us"] and meter["overhead_ok"] == (meter["meter_overhead_us"] < 50)
    low, high = meter["meter_over_timer_interval"]
    assert low <= meter["meter_over_timer"] <= high
    assert (meter["instrument_check"] == "agree") == (1 / 1.05 <= low and high <= 1.05)
    if meter["instrument_check"] == "disagree":
        assert (low > 1 or high < 1) and abs(meter["meter_over_timer"] - 1) > 0.04


def test_rows_keep_samples_ordered_statistics_and_p99_only_from_100_samples(run):
    rows = [row for row in run[2]["rows"] if "p50_ms" in row]
    assert rows
    for row in rows:
        assert len(row["samples_ms"]) == row["runs"], row["measurement"]
        assert row["ci95_low_ms"] <= row["p50_ms"] <= row["ci95_high_ms"], row["measurement"]
        assert row["p50_ms"] <= row["p90_ms"] <= row["max_ms"] == pytest.approx(max(row["samples_ms"]))
        assert (row["p99_ms"] is None) == (row["runs"] < 100)
    loads = [row for row in run[2]["rows"] if row["section"] == "2. Model load time"]
    assert loads and all(row["runs"] == 1 and row["samples_ms"] == [row["load_ms"]] for row in loads)


def test_tasks_count_real_tokens_and_report_one_tokens_per_second(run):
    from transformers import AutoTokenizer

    from common import models

    section = run[2]["sections"]["3. Task benchmarks"]
    tasks = {task["task"]: task for task in section["tasks"]}
    assert sorted(tasks) == sorted(TASKS)
    # each task's last row is its whole call (generation's 1-token row comes first)
    rows = {row["measurement"].split(" (")[0]: row for row in run[2]["rows"] if row["section"] == "3. Task benchmarks"}
    for name, task in tasks.items():
        assert section["latency_samples_ms"][name] == rows[name]["samples_ms"]
        assert task["p50_ms"] == pytest.approx(float(np.median(rows[name]["samples_ms"])))
    tokenizer = AutoTokenizer.from_pretrained(models.bundled_folder("all-MiniLM-L6-v2"))
    batch = texts.repeated_sentences(script.TASK_TEXTS)
    unpadded = sum(len(tokenizer(text)["input_ids"]) for text in batch)
    assert unpadded < len(batch) * max(len(tokenizer(text)["input_ids"]) for text in batch)  # padding would show
    encoder = tasks["feature-extraction"]
    assert encoder["items_per_s"] == pytest.approx(len(batch) * 1e3 / encoder["p50_ms"])  # from the median
    assert encoder["tokens_per_s"] / encoder["items_per_s"] == pytest.approx(unpadded / len(batch))
    generation = tasks["text-generation"]
    assert generation["tokens_per_s"] / generation["items_per_s"] == pytest.approx(script.QUICK.new_tokens)
    assert generation["tokens_per_s"] == pytest.approx(script.QUICK.new_tokens * 1e3 / generation["p50_ms"])
    assert section["generation"]["new_tokens"] == script.QUICK.new_tokens
    assert not any("tokens_per_s" in key for key in section["generation"])  # the one tokens/s is the task row's
    for name, task in tasks.items():  # cores busy is the meter's CPU time / wall time, as a count of cores
        assert task["cores_busy"] == pytest.approx(rows[name]["cpu_util_pct"] / 100)


def test_a_twins_output_is_never_shown_but_the_twin_is_explained_once(run):
    stdout = run[0].stdout
    assert "t5-small (twin)" in stdout and "text-to-text output:" not in stdout  # bundled: t5-small is a twin
    assert " ".join(stdout.split()).count(script.TWIN_NOTE) == 1


def test_sweep_rows_are_their_own_medians_and_the_knee_sentence_agrees_with_the_report(run):
    done, _, report = run
    sweeps = report["sections"]["4. Batch-size sweep"]
    assert sorted(sweeps) == ["classifier", "encoder"]
    assert len({sweep["workload"] for sweep in sweeps.values()}) == 2  # same model, two workloads, two knees
    for sweep in sweeps.values():
        table = sweep["table"]
        assert tuple(row["batch"] for row in table) == script.QUICK.sweep_batches
        measurement = f"batch sweep: {sweep['role']}"
        csv_rows = {row["batch"]: row for row in report["rows"] if row.get("measurement") == measurement}
        for row in table:  # each size's texts/s is its own median's, and its interval the median's
            own = csv_rows[row["batch"]]
            assert row["p50_ms"] == pytest.approx(own["p50_ms"]) == pytest.approx(float(np.median(own["samples_ms"])))
            assert row["items_per_s"] == pytest.approx(row["batch"] * 1e3 / own["p50_ms"])
            assert row["items_per_s_low"] <= row["items_per_s"] <= row["items_per_s_high"]
        assert "best_batch" not in sweep  # one story: the knee, and what the best larger batch gives beyond it
        beyond = sweep["beyond_knee"]
        if sweep["knee_batch"] is None:
            assert beyond is None and f"{sweep['role']}: no knee up to batch" in done.stdout
            continue
        sentence = f"{sweep['role']}: knee at batch {sweep['knee_batch']}"
        assert sentence in done.stdout
        assert beyond["batch"] > sweep["knee_batch"]
        assert beyond["verdict"] == verdict_of(beyond["low"], beyond["high"]) != "faster"
        assert f"{beyond['gain']:.2f}x its texts/s [{beyond['low']:.2f}-{beyond['high']:.2f}]: " \
               f"{VERDICT_WORDS[beyond['verdict']]}" in " ".join(done.stdout.split())


def test_report_tex_and_md_are_the_article_with_the_csv_medians_and_intervals(run):
    _, out, report = run
    tex, markdown = (out / "report.tex").read_text(), (out / "report.md").read_text()
    assert tex.startswith(r"\documentclass") and tex.rstrip().endswith(r"\end{document}")
    for heading in ("Method", "Environment", "Results", "Figures", "Limitations"):
        assert f"\\section{{{heading}}}" in tex and f"## {heading}" in markdown
    assert report["environment"]["cpu"] in markdown.split("## Method")[0]  # the abstract names the machine
    with open(out / "results.csv", newline="") as stream:
        tasks = [row for row in csv.DictReader(stream) if row["section"] == "3. Task benchmarks"]
    for row in tasks:  # each task's median and interval, as the csv has them, in both documents
        cells = " & ".join([paper.number(float(row["p50_ms"])),
                            paper.interval(float(row["ci95_low_ms"]), float(row["ci95_high_ms"]))])
        assert cells in tex and cells.replace(" & ", " | ") in markdown
    for chart in report["charts"]:
        assert Path(chart).name in tex


def test_devices_and_seed_table_cover_what_this_machine_has(run):
    report = run[2]
    devices = report["sections"]["5. Devices"]
    assert devices[0]["workload"] == "cpu" and devices[0]["items_per_s"] > 0
    if len(devices) > 1:  # the CPU alone is one line, with nothing to race
        assert devices[0]["speedup"] == pytest.approx(1.0) and devices[0]["verdict"] == "baseline"
    seed = report["sections"]["6. The course notes' table, reproduced"]
    assert seed["input_shape"] == f"[1, {script.SEED_INPUT_TOKENS}]"
    assert [(row["model"], row["device"], row["notes_time_s"]) for row in seed["rows"]] == \
        [(model, device, time_s) for (model, device), (time_s, _) in script.SEED_TABLE.items()]
    for row in seed["rows"]:
        if row["device"] == "CPU":
            assert row["ours_over_notes_time"] == pytest.approx(row["ours_time_s"] / row["notes_time_s"])
    ratio = seed["distilbert_vs_bert"]["CPU"]
    assert ratio["verdict"] in ("faster", "slower", "same", "negligible", "inconclusive")
    low, high = ratio["ours_interval"]
    assert low <= ratio["ours"] <= high and ratio["notes_inside"] == (low <= ratio["notes"] <= high)
    assert ratio["notes"] == pytest.approx(0.089 / 0.045)
    if not torch.cuda.is_available():
        assert len(devices) == 1 and "device cuda" in report["skipped"]
        assert all(row.get("ours_time_s") is None for row in seed["rows"] if row["device"] == "GPU")


def test_gpu_rows_follow_the_runs_device(monkeypatch):
    """Under --device cpu a present GPU is not timed (the environment would not describe it), but named as skipped."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices, missing = script.available_devices(torch.device("cpu"))
    assert devices == [torch.device("cpu")] and "--device cpu" in missing["cuda"]
    devices, missing = script.available_devices(torch.device("cuda", 1))
    assert devices == [torch.device("cpu"), torch.device("cuda", 1)] and "cuda" not in missing


@cuda_test
def test_gpu_rows_are_measured_with_cuda_memory(run):
    report = run[2]
    devices = {row["workload"]: row for row in report["sections"]["5. Devices"]}
    gpu = f"cuda:{torch.cuda.current_device()}"  # the run's GPU, by index
    assert devices[gpu]["verdict"] in ("faster", "slower", "same", "negligible", "inconclusive")
    cpu_row, gpu_row = (next(row for row in report["rows"] if row["section"] == "5. Devices" and row["device"] == name)
                        for name in ("cpu", gpu))
    assert gpu_row["cuda_alloc_mib"] > 0 and cpu_row["gpu_util_pct"] is None
    for row in report["sections"]["6. The course notes' table, reproduced"]["rows"]:
        if row["device"] == "GPU":
            assert row["ours_time_s"] > 0 and row["memory_measured_as"].startswith("CUDA")


def test_loads_time_from_pretrained_twice(run):
    loads = run[2]["sections"]["2. Model load time"]
    assert len(loads) == len(script.QUICK.load_roles)
    for load in loads:
        assert load["cold_s"] > 0 and load["warm_s"] > 0 and load["class"].startswith("AutoModel")
        assert load["cold_over_warm"] == pytest.approx(load["cold_s"] / load["warm_s"])
        # time to first inference is the load plus a first inference; the weights are resident after it
        assert load["cold_ttfi_s"] > load["cold_s"] and load["warm_ttfi_s"] > load["warm_s"]
        assert load["cold_resident_mib"] > 0.5 * load["weights_mib"]


def test_compare_checks_machine_environment_and_instrument_before_the_table(run):
    done, _, report = run
    stdout = done.stdout
    assert "[machine] the machine ran" in stdout and "slower during this run" in stdout
    assert "torch: 1.0.0 -> " in stdout
    assert "[instrument] in the earlier run the meter-vs-Timer check said 'disagree'" in stdout
    assert stdout.index("[machine]") < stdout.index("Now vs ")
    result = report["sections"]["8. Report and comparison"]
    assert result["machine"]["differs"] is True and result["machine"]["factor"] > 1
    assert any(change.startswith("torch: 1.0.0") for change in result["environment_changes"])
    (row,) = result["comparison"]
    # the machine changed, so even a 1000 s call before gets no verdict: only its ratios, as information
    assert row["measurement"] == "one pipeline call" and row["verdict"] == runs.NOT_COMPARABLE
    assert row["verdict_on"] == "withheld" and row["raw_x"] < 0.1
    assert (result["only_before"], result["counts"]) == (1, {runs.NOT_COMPARABLE: 1})
    assert "verdicts withheld, because the machine changed beyond its own noise" in stdout


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
            elif isinstance(value, list):
                assert json.loads(csv_row[key]) == value, key
            else:
                assert csv_row[key] == value


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
    def measured(ctx):
        """A section that finished."""
        return {"measured": 1.5}

    def interrupted(ctx):
        """A section the user stopped."""
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "SECTIONS", {"meter": ("1. Meet the meter", measured),
                                             "loads": ("2. Model load time", interrupted)})
    with pytest.raises(SystemExit) as exit_info:
        cli.run(script.main, ["--quick", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 130
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partial"] is True
    assert report["sections"] == {"1. Meet the meter": {"measured": 1.5}}
    assert "2. Model load time" in report["failures"]
    assert "Partial report" in (tmp_path / "report.md").read_text()
