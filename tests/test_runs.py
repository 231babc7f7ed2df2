"""common.runs: the --compare logic on synthetic reports (machine check, environment diff, per-row verdicts)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from common import runs
from common.errors import UserError
from common.report import format_table

ENVIRONMENT = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "bitsandbytes": "0.50.2",
               "device": "cpu", "torch_threads": 2, "cpu": "AMD EPYC", "cpu_flags": ["avx2", "fma"],
               "source": "bundled", "quick": True}
MODELS = [{"role": "encoder", "name": "all-MiniLM-L6-v2", "source": "bundled"},
          {"role": "decoder", "name": "SmolLM2-135M-Instruct", "source": "bundled"}]


def samples(median_ms: float, n: int, seed: int) -> list[float]:
    """n positive timings around a median with a 5% log-normal spread (fixed seed: the same every run)."""
    return list(median_ms * np.random.default_rng(seed).lognormal(0.0, 0.05, n))


def calibration(scale: float = 1.0, end_scale: float = 1.0) -> dict:
    """Start and end calibration points whose matmul timings are multiplied by scale (and end_scale at the end)."""
    return {"start": {"matmul_samples_s": [0.03 * scale * x for x in samples(1, 7, 1)]},
            "end": {"matmul_samples_s": [0.03 * scale * end_scale * x for x in samples(1, 7, 2)]}}


def report(rows_scale: dict[int, float] | None = None, calibration_scale: float = 1.0) -> dict:
    """A report with four measurements (the last with one sample), some rows' samples scaled."""
    rows_scale = rows_scale or {}
    rows = [{"section": "3. Tasks", "measurement": name, "model": "m", "device": "cpu", "batch": batch,
             "samples_ms": [x * rows_scale.get(i, 1.0) for x in samples(median, n, seed=10 + i)]}
            for i, (name, batch, median, n) in enumerate([("encode", 8, 40.0, 12), ("generate", None, 900.0, 5),
                                                           ("sweep", 4, 120.0, 8), ("cold load", None, 300.0, 1)])]
    return {"environment": dict(ENVIRONMENT), "models": copy.deepcopy(MODELS), "rows": rows,
            "calibration": calibration(calibration_scale)}


def verdicts(comparison: runs.RunComparison) -> dict[str, str]:
    return {change.key["measurement"]: change.verdict for change in comparison.changes}


def test_identical_reports_show_no_difference_anywhere():
    comparison = runs.compare_reports(report(), report())
    assert verdicts(comparison) == {"encode": runs.WITHIN_NOISE, "generate": runs.WITHIN_NOISE,
                                    "sweep": runs.WITHIN_NOISE, "cold load": "too few samples"}
    assert not comparison.machine.differs and comparison.machine.lines == []
    assert comparison.machine.factor == pytest.approx(1.0)
    assert comparison.environment == []
    assert (comparison.only_before, comparison.only_now) == (0, 0)
    assert all(change.ratio == pytest.approx(1.0) and change.basis == "raw" for change in comparison.changes)


def test_machine_three_times_slower_is_flagged_and_every_verdict_withheld():
    now = report(rows_scale={0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0}, calibration_scale=3.0)
    comparison = runs.compare_reports(report(), now)
    machine = comparison.machine
    assert machine.differs and machine.factor == pytest.approx(3.0)
    assert machine.low <= 3.0 <= machine.high
    assert "the machine ran 3.0x slower during this run" in machine.lines[0]
    assert "cannot be told apart from machine state" in machine.lines[0]
    for change in comparison.changes:
        assert change.ratio == pytest.approx(3.0)  # raw: everything three times slower ...
        assert change.normalised_ratio == pytest.approx(1.0)  # ... shown as information ...
        assert change.basis == "withheld"  # ... but no verdict: one factor cannot undo a busy machine
    assert set(verdicts(comparison).values()) == {runs.NOT_COMPARABLE}
    assert comparison.to_dict()["machine"]["differs"] is True


def test_a_small_machine_difference_is_not_flagged():
    comparison = runs.compare_reports(report(), report(calibration_scale=1.05))
    assert comparison.machine.high < 1.05 * 1.1 and not comparison.machine.differs  # real, but under 10%


def test_earlier_run_on_a_slower_machine_is_named_the_other_way_round():
    comparison = runs.compare_reports(report(calibration_scale=2.5), report())
    assert "the machine ran 2.5x slower during the earlier run" in comparison.machine.lines[0]


def test_only_samples_scaled_gives_slower_on_exactly_those_rows():
    comparison = runs.compare_reports(report(), report(rows_scale={0: 3.0, 2: 3.0}))
    assert not comparison.machine.differs
    assert verdicts(comparison) == {"encode": "slower", "generate": runs.WITHIN_NOISE, "sweep": "slower",
                                    "cold load": "too few samples"}
    assert comparison.counts() == {"slower": 2, runs.WITHIN_NOISE: 1, "too few samples": 1}


def test_busy_then_quiet_pair_withholds_every_verdict_and_says_why(capsys):
    """The earlier run shared the cores with two busy loops: its calibration and rows were slower, each row by its
    own factor (a matmul on two threads slows differently from a tokenizer on one). No code changed."""
    busy = report(rows_scale={0: 1.6, 1: 4.0, 2: 6.5, 3: 3.0}, calibration_scale=5.7)
    comparison = runs.compare_reports(busy, report())
    assert comparison.machine.differs
    assert set(verdicts(comparison).values()) == {runs.NOT_COMPARABLE}
    assert all(change.normalised_ratio != pytest.approx(1.0, rel=0.1) for change in comparison.changes[:3])
    runs.print_comparison(comparison, "Now vs busy")
    printed = capsys.readouterr().out
    assert "verdicts withheld, because the machine changed beyond its own noise" in printed
    assert "faster" not in printed.split("Now vs busy")[1].replace("[machine]", "") or "0 faster" in printed


def test_a_quiet_a_a_pair_gives_at_most_one_false_verdict_in_twenty():
    """Synthetic A/A pairs: no code change, each run shifted as a whole (run-to-run sd 5%, which gives the 35% of
    false verdicts seen with the 3% band) on top of 5% noise within the run. The run band keeps them to 1 in 20."""
    rng = np.random.default_rng(7)
    decided = false_at_3pct = 0
    pairs = 200
    for _ in range(pairs):
        shifts = rng.lognormal(0.0, 0.05, 2)
        old, new = (list(100.0 * shift * rng.lognormal(0.0, 0.05, 12)) for shift in shifts)
        ratio, low, high, coverage = runs.ratio_interval(old, new)
        decided += runs.verdict(low, high, coverage) in ("faster", "slower")
        false_at_3pct += low > 1.03 or high < 1 / 1.03
    assert decided / pairs <= 1 / 20
    assert false_at_3pct / pairs > 1 / 5  # the within-run interval alone calls run-to-run drift a change


def test_faster_rows_and_rows_in_one_run_only():
    now = report(rows_scale={1: 1 / 3})
    now["rows"].append({"section": "3. Tasks", "measurement": "new", "device": "cpu", "samples_ms": [1.0, 2.0]})
    before = report()
    before["rows"][0]["measurement"] = "renamed"
    comparison = runs.compare_reports(before, now)
    assert verdicts(comparison)["generate"] == "faster"
    assert "encode" not in verdicts(comparison) and (comparison.only_before, comparison.only_now) == (1, 2)


def test_a_gpu_row_is_not_normalised_by_a_cpu_calibration():
    before, now = report(), report(calibration_scale=3.0)
    for rows in (before["rows"], now["rows"]):
        rows[0]["device"] = "cuda"
    change = next(c for c in runs.compare_reports(before, now).changes if c.key["measurement"] == "encode")
    assert change.normalised_ratio == pytest.approx(change.ratio) == pytest.approx(1.0)


def test_environment_differences_are_named():
    now = report()
    now["environment"].update(torch="2.14.0", quick=False, torch_threads=1)
    now["models"][1] = {"role": "decoder", "name": "gpt2", "source": "hub"}
    changes = runs.environment_changes(report(), now)
    assert "torch: 2.13.0+cpu -> 2.14.0" in changes
    assert "--quick: True -> False" in changes
    assert "torch threads: 2 -> 1" in changes
    assert "model for decoder: SmolLM2-135M-Instruct (bundled) -> gpt2 (hub)" in changes
    assert len(changes) == 4


def test_drift_within_a_run_is_reported():
    now = report()
    now["calibration"] = calibration(end_scale=2.0)
    lines = runs.machine_check(report()["calibration"], now["calibration"]).lines
    assert [line for line in lines if "changed during" in line] == [
        "the machine changed during this run: calibration matmul went from 8.8 GFLOP/s at its start to 4.5 at a "
        "later check (1 of 1 checks moved beyond +-10%), so part of that run's rows ran on another machine state than the rest: "
        "no row gets a faster/slower verdict"]
    check = runs.machine_check(report()["calibration"], now["calibration"])
    assert check.drifted and check.differs
    assert not runs.machine_check(report()["calibration"], report()["calibration"]).drifted


def test_a_run_that_drifted_gets_no_verdict_even_when_the_pooled_factor_is_one():
    """An A/A pair of 04 --quick: the second run slowed about 3x for its last sections only. Pooled over start and
    end its calibration matched the first run's, yet those sections' rows looked 3x slower."""
    now = report(rows_scale={2: 3.0})
    now["calibration"] = {"start": {"matmul_samples_s": [0.02] * 7}, "end": {"matmul_samples_s": [0.04] * 7}}
    before = report()
    before["calibration"] = {"start": {"matmul_samples_s": [0.03] * 7}, "end": {"matmul_samples_s": [0.03] * 7}}
    comparison = runs.compare_reports(before, now)
    assert comparison.machine.drifted and comparison.machine.differs
    assert set(verdicts(comparison).values()) == {runs.NOT_COMPARABLE}


def test_a_drifting_run_with_a_big_difference_is_flagged_even_with_a_wide_interval():
    before = report()
    before["calibration"] = {"start": {"matmul_samples_s": [0.09] * 7}, "end": {"matmul_samples_s": [0.03] * 7}}
    check = runs.machine_check(before["calibration"], report()["calibration"])
    assert check.low < 1 < check.high  # pooled start and end: an interval too wide to exclude 1 ...
    assert check.drifted and check.differs  # ... yet the earlier run was unsteady and far slower at its median
    assert check.lines[0].startswith("the machine ran") and "changed during the earlier run" in check.lines[1]


def test_missing_calibration_says_the_machine_cannot_be_checked():
    before = report()
    before["calibration"] = {}
    comparison = runs.compare_reports(before, report())
    assert comparison.machine.factor is None and not comparison.machine.differs
    assert "cannot be checked" in comparison.machine.lines[0]
    assert all(change.basis == "raw" for change in comparison.changes)


def test_mann_whitney_counts_are_a_distribution():
    for m, n in [(1, 1), (2, 3), (3, 3), (5, 7)]:
        counts = runs.mann_whitney_counts(m, n)
        assert sum(counts) == math.comb(m + n, m)
        assert counts == counts[::-1]  # U is symmetric about mn/2
    assert runs.mann_whitney_counts(2, 2) == (1, 1, 2, 1, 1)


@pytest.mark.parametrize("m, n, k, coverage", [
    (3, 3, 1, 0.9),  # no 95% interval exists: the widest one covers 90%
    (5, 5, 3, 1 - 2 * (1 + 1 + 2) / 252),  # published critical value U = 2: P(U <= 2) = 4/252
    (10, 10, 24, None),  # published critical value U = 23
])
def test_moses_rank_matches_the_tables(m, n, k, coverage):
    got_k, got_coverage = runs.moses_rank(m, n)
    assert got_k == k
    assert got_coverage >= 0.95 or (m, n) == (3, 3)
    if coverage is not None:
        assert got_coverage == pytest.approx(coverage)


def test_normal_approximation_agrees_with_the_exact_rank_at_the_boundary():
    exact_k, _ = runs.moses_rank(25, 25)
    sigma = math.sqrt(25 * 25 * 51 / 12)
    approximate_k = math.floor(25 * 25 / 2 - runs.Z95 * sigma + 0.5)
    assert abs(exact_k - approximate_k) <= 1
    k, coverage = runs.moses_rank(30, 30)
    assert coverage == pytest.approx(0.95, abs=0.01) and 1 <= k < 450


def test_ratio_interval_of_a_doubled_sample():
    before = samples(10.0, 9, seed=3)
    estimate, low, high, coverage = runs.ratio_interval(before, [2 * x for x in before])
    assert estimate == pytest.approx(2.0) and low < 2.0 < high and coverage >= 0.95
    with pytest.raises(ValueError):
        runs.ratio_interval([], [1.0])


def test_print_comparison_puts_the_machine_line_before_the_table(capsys):
    comparison = runs.compare_reports(report(), report(rows_scale={0: 3.0, 1: 3.0, 2: 3.0}, calibration_scale=3.0))
    runs.print_comparison(comparison, "Now vs before")
    out = capsys.readouterr().out
    assert out.index("[machine] the machine ran 3.0x slower") < out.index("Now vs before")
    assert "verdicts withheld" in out


def test_compare_chart_is_a_png(tmp_path, png_ok):
    comparison = runs.compare_reports(report(), report(rows_scale={0: 3.0}))
    path = runs.draw_comparison(comparison, tmp_path)
    assert path.name == "compare.png" and png_ok(path)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"script": "other", "rows": [], "report_version": 1}), "not a report.json"),
    (json.dumps({"script": "lesson", "rows": [], "report_version": 0}), "incompatible"),
])
def test_load_report_refuses_what_it_cannot_compare(tmp_path, content, message):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        runs.load_report(path, "lesson", 1)


def test_calibration_keeps_its_raw_timings_for_the_comparison():
    from common.calibration import COPY_MIB, MATMUL_SIZE, ROUNDS, calibrate

    point = calibrate()
    assert len(point["matmul_samples_s"]) == len(point["copy_samples_s"]) == ROUNDS
    assert point["matmul_gflops"] == pytest.approx(2 * MATMUL_SIZE**3 / np.median(point["matmul_samples_s"]) / 1e9)
    assert point["copy_gb_s"] == pytest.approx(2 * COPY_MIB * 2**20 / np.median(point["copy_samples_s"]) / 1e9)
    assert runs.machine_check({"start": point}, {"start": point}).factor == pytest.approx(1.0)


def test_agreement_needs_the_whole_interval_inside_the_tolerance():
    assert runs.agreement(1.01, 0.98, 1.04, 0.05) == "agree"
    assert runs.agreement(1.20, 1.10, 1.30, 0.05) == "disagree"  # excludes 1 and 20% off
    assert runs.agreement(1.03, 1.01, 1.06, 0.05) == "inconclusive"  # excludes 1, but the estimate is within 5%
    assert runs.agreement(1.00, 0.80, 1.25, 0.05) == "inconclusive"  # too wide to say either way
    assert runs.agreement(0.80, 0.70, 0.90, 0.05) == "disagree"  # slower counts the same as faster


def test_result_row_adds_tail_interval_memory_and_raw_samples():
    from common.memory import MIB
    from common.meter import Measurement, Stats

    samples = [0.010, 0.012, 0.011, 0.030, 0.013]
    m = Measurement(name="w", samples_s=samples, stats=Stats.from_samples(samples), items_per_call=4,
                    tokens_per_call=0, items_per_s=4 / 0.012, tokens_per_s=0.0, peak_rss_bytes=300 * MIB,
                    peak_rss_delta_bytes=20 * MIB, peak_cuda_allocated_bytes=5 * MIB, peak_cuda_reserved_bytes=0,
                    cpu_util_pct=90.0, gpu_util_pct=None, noisy=True, wall_s=0.1)
    row = runs.result_row(m, measurement="w", device="cpu", batch=4)
    assert list(row)[:3] == ["measurement", "device", "batch"]  # labels first, as compare_reports keys them
    assert row["p50_ms"] == pytest.approx(12.0) and row["max_ms"] == pytest.approx(30.0)
    assert row["p99_ms"] is None  # 5 samples: no p99, the max stands in
    assert row["ci95_low_ms"] <= row["p50_ms"] <= row["ci95_high_ms"]
    assert (row["peak_rss_mib"], row["working_rss_mib"]) == (300, 20)
    assert row["cuda_alloc_mib"] is None  # a CPU row never shows CUDA memory
    assert runs.result_row(m, device="cuda:0")["cuda_alloc_mib"] == 5
    assert row["samples_ms"] == pytest.approx([10.0, 12.0, 11.0, 30.0, 13.0])  # raw, in order
    assert row["noisy"] is True and "tokens_per_s" not in row


def test_a_cuda_run_calibrates_the_gpu_and_compare_sees_a_gpu_change(monkeypatch):
    from common import calibration

    monkeypatch.setattr(calibration, "cuda_matmul_flops", lambda device, calls: 5e13)
    assert calibration.calibrate(torch.device("cuda", 0))["gpu_matmul_gflops"] == 5e4
    assert calibration.calibrate("cpu")["gpu_matmul_gflops"] is None
    t4 = {"name": "Tesla T4", "capability": "7.5", "driver": "550.54.15"}
    before = {"environment": {"gpu": t4, "float32_matmul_precision": "highest"}}
    now = {"environment": {"gpu": {**t4, "name": "NVIDIA A100"}, "float32_matmul_precision": "high"}}
    changes = runs.environment_changes(before, now)
    assert any(c.startswith("GPU: ") and "A100" in c for c in changes)
    assert "fp32 matmul precision: highest -> high" in changes


def shared_rows_report(scales: list[float], seed: int) -> dict:
    """A report with one row per scale (12 samples each, 5% spread within the run), the calibration unchanged."""
    rows = [{"section": "4. Sweep", "measurement": f"row {i}", "model": "m", "device": "cpu", "batch": 8,
             "samples_ms": [x * scale for x in samples(50.0 + 10 * i, 12, seed=100 * seed + i)]}
            for i, scale in enumerate(scales)]
    return {"environment": dict(ENVIRONMENT), "models": copy.deepcopy(MODELS), "rows": rows,
            "calibration": calibration()}


def test_rows_that_move_together_widen_the_band_so_a_quiet_a_a_pair_calls_nothing(capsys):
    """As seen in a quiet A/A pair of 04 --quick on a shared VM: the calibration did not move, but most rows ran
    1.2-1.7x slower in the second run. No code changed, so no row may be called faster or slower."""
    moved = [1.3, 1.3, 1.35, 1.3, 1.55, 1.5, 1.7, 1.5, 1.1, 1.2, 1.2, 1.0, 0.9, 1.25, 1.4, 1.3]
    comparison = runs.compare_reports(shared_rows_report([1.0] * len(moved), 1), shared_rows_report(moved, 2))
    assert not comparison.machine.differs
    assert comparison.band > 0.5
    assert not {"faster", "slower"} & set(verdicts(comparison).values())
    runs.print_comparison(comparison, "A/A")
    out = capsys.readouterr().out
    assert f"beyond +-{comparison.band:.0%}" in out and "most rows moved together (slower" in out


def test_a_few_rows_that_really_changed_stand_out_from_many_that_did_not():
    scales = [1.0] * 13 + [2.0, 2.5, 0.4]
    comparison = runs.compare_reports(shared_rows_report([1.0] * 16, 3), shared_rows_report(scales, 4))
    assert comparison.band == pytest.approx(runs.RUN_BAND)  # the 13 unchanged rows barely moved
    said = verdicts(comparison)
    assert [said[f"row {i}"] for i in (13, 14, 15)] == ["slower", "slower", "faster"]
    assert all(said[f"row {i}"] == runs.WITHIN_NOISE for i in range(13))


def test_run_band_needs_enough_rows_to_widen():
    assert runs.run_band([1.5] * (runs.MIN_ROWS_FOR_SPREAD - 1)) == runs.RUN_BAND
    wide = runs.run_band([1.5] * runs.MIN_ROWS_FOR_SPREAD)
    assert wide == pytest.approx(math.exp(runs.RUN_SPREAD_Z * 1.4826 * math.log(1.5)) - 1)


def test_console_table_fits_120_columns_and_keeps_every_column_in_the_json():
    long = shared_rows_report([1.0] * 3, 5)
    for row in long["rows"]:
        row.update(measurement="text-generation (1 prompt, 8 new tokens)", model="all-MiniLM-L6-v2 prototype classifier")
    long["rows"][0]["measurement"] += " x"  # keep keys distinct
    long["rows"][1]["measurement"] += " y"
    comparison = runs.compare_reports(long, copy.deepcopy(long))
    text = format_table(comparison.console_table(), runs.TABLE_COLUMNS)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "all-MiniLM-L6-v2 ..." in text and "text-generation (1 prompt, 8 new toke..." in text
    assert {"raw_interval", "normalised_x", "coverage", "verdict_on"} <= set(comparison.to_dict()["comparison"][0])


def test_a_slowdown_between_sections_is_seen_by_the_checkpoint_after_it():
    """04 calibrates after every section: a neighbour busy for two sections only, gone by the end, is caught."""
    now = report(rows_scale={2: 3.0})
    now["calibration"]["sections"] = [{"matmul_samples_s": [0.03 * x for x in samples(1, 7, 3)]},
                                      {"matmul_samples_s": [0.09 * x for x in samples(1, 7, 4)]},
                                      {"matmul_samples_s": [0.03 * x for x in samples(1, 7, 5)]}]
    comparison = runs.compare_reports(report(), now)
    assert comparison.machine.drifted and set(verdicts(comparison).values()) == {runs.NOT_COMPARABLE}
    assert "(1 of 4 checks moved beyond +-15%)" in comparison.machine.lines[-1]
    quiet = report()
    quiet["calibration"]["sections"] = [{"matmul_samples_s": [0.03 * x for x in samples(1, 7, 6 + i)]}
                                        for i in range(3)]
    assert not runs.compare_reports(report(), quiet).machine.drifted


def test_drift_smaller_than_the_rows_own_band_is_no_reason_to_withhold():
    # Ten rows moved 1.6x either way between the runs, so every verdict needs more than that; a calibration check
    # that moved 1.3x within the run cannot push a row past such a band, and withholding would only hide verdicts.
    def many_rows(scale: float) -> dict:
        base = report()
        base["rows"] = [{"section": "3. Tasks", "measurement": f"m{i}", "model": "m", "device": "cpu",
                         "samples_ms": [x * scale ** (-1) ** i for x in samples(50.0, 12, seed=40 + i)]}
                        for i in range(10)]
        return base

    now = many_rows(1.6)
    now["calibration"]["sections"] = [{"matmul_samples_s": [0.03 * 1.3 * x for x in samples(1, 7, 3)]}]
    comparison = runs.compare_reports(many_rows(1.0), now)
    assert comparison.band > 0.6 and not comparison.machine.drifted and not comparison.machine.differs
    assert set(verdicts(comparison).values()) == {runs.WITHIN_NOISE}  # the A/A truth, now said instead of withheld
    lines = runs.machine_check(report()["calibration"], now["calibration"]).lines  # at the 10% machine band it is
    assert any("changed during this run" in line for line in lines)


def test_withheld_verdicts_show_the_raw_ratio_beside_the_normalised_one_and_say_which_to_read(capsys):
    """Issue 27's quiet pair: no code changed and the rows agreed, but the earlier run's calibration read 1.3x slow
    (taken cold). Its normalised ratios alone read as a 1.3x change that did not happen."""
    before, now = report(calibration_scale=1.3), report()
    for row in before["rows"] + now["rows"]:
        row.update(measurement="text-generation (1 prompt, 8 new tokens)", model="all-MiniLM-L6-v2 prototype classifier")
    for i, row in enumerate(before["rows"] + now["rows"]):
        row["measurement"] += f" {i % 4}"  # keep keys distinct, pairing each row with its twin in the other run
    comparison = runs.compare_reports(before, now)
    assert comparison.machine.differs
    encode = next(change for change in comparison.changes if change.key["measurement"].endswith(" 0"))
    row = comparison.console_table()[comparison.changes.index(encode)]
    assert set(row) == set(runs.WITHHELD_COLUMNS) and "verdict" not in row
    assert row["raw now/before"] == f"{encode.ratio:.2f}x [{encode.low:.2f}-{encode.high:.2f}]" == "1.00x [0.97-1.03]"
    assert row["normalised"].startswith(f"{encode.normalised_ratio:.2f}x [")
    assert abs(encode.normalised_ratio - 1.0) > 0.2  # what the normalised column alone would have suggested
    text = format_table(comparison.console_table(), comparison.columns())
    assert max(len(line) for line in text.splitlines()) <= 120
    runs.print_comparison(comparison, "Now vs before")
    printed = capsys.readouterr().out
    assert "raw now/before" in printed and "normalised" in printed
    assert "Read the raw column: it is what the two runs timed" in printed
    assert max(len(line) for line in printed.splitlines()) <= 120
