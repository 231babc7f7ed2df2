"""Comparing two runs of a lesson: was the machine the same, what changed in the environment, what got slower.

Each shared measurement gets a verdict from both runs' raw samples. The interval for now/before is the Moses
(Hodges-Lehmann) interval: order statistics of all pairwise ratios now_j / before_i, with ranks from the exact
Mann-Whitney distribution (a normal approximation above MW_EXACT_MAX samples a side). It is exact and assumes
only that the two runs' times differ by a scale factor, so it is an interval for the ratio of their medians.
Below about 5 samples a side no 95% interval exists; the real coverage is then kept and shown. The machine check
applies the same interval to the calibration timings (common.calibration) of the two runs.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from common import plots
from common.calibration import MATMUL_SIZE
from common.errors import UserError
from common.memory import MIB
from common.meter import Measurement
from common.report import print_table, say

# The machine "differs" when the calibration interval excludes 1 (a real difference) and the estimate is more than
# 10% away from it (a difference big enough to matter): then no row gets a verdict, because one scalar cannot undo a
# busy machine (a matmul on two threads slows differently from a tokenizer on one).
MACHINE_BAND = 0.10
# Two runs are two processes: each row's interval comes from samples within one run, which miss how much a whole
# run moves against another. A row is called faster or slower only when its whole interval lies beyond a run band:
# at least +-15% (synthetic A/A pairs with 5% run-to-run sd then give about 1 false verdict in 20), and wider when
# the shared rows themselves moved more. On a VM with noisy neighbours, quiet A/A pairs of 04 --quick (no code
# change, calibration unchanged) moved rows 1.1-1.7x together, so the rows are replicates of that movement: their
# robust sd (1.4826 x the median |log ratio|) times RUN_SPREAD_Z sets the band once there are enough of them. A code
# change that moves a few rows stands out; one that moves most rows looks like machine state and is not called.
RUN_BAND = 0.15
RUN_SPREAD_Z = 2.5
MIN_ROWS_FOR_SPREAD = 8
NOT_COMPARABLE = "not comparable"  # the machine changed between the runs
WITHIN_NOISE = "run-to-run noise"
MIN_COVERAGE = 0.80  # an interval covering less than this is no basis for a verdict ("too few samples")
MW_EXACT_MAX = 25  # exact Mann-Whitney counts up to this many samples a side
Z95 = 1.959963984540054
ROW_KEY = ("section", "measurement", "model", "device", "batch", "workload")
TABLE_COLUMNS = ["measurement", "model", "before", "now", "now/before", "verdict"]  # the rest: report.json
# When the machine changed every verdict is withheld (said once below the table): the raw ratio, what was timed,
# stands beside the normalised one, so that a normalised 1.25x is never read as a speed-up on its own.
WITHHELD_COLUMNS = ["measurement", "model", "before", "now", "raw now/before", "normalised"]
CELL_WIDTHS = {"measurement": 40, "model": 20}  # compare-table cells cut with "..." so that it fits 120 columns
ENVIRONMENT = {"python": "python", "torch": "torch", "transformers": "transformers", "bitsandbytes": "bitsandbytes",
               "device": "device", "torch_threads": "torch threads", "cpu": "CPU", "cpu_flags": "CPU flags",
               "source": "--source", "quick": "--quick", "gpu": "GPU",
               "float32_matmul_precision": "fp32 matmul precision"}


def agreement(ratio: float, low: float, high: float, tolerance: float) -> str:
    """Two instruments' ratio: agree (interval within 1±tolerance), disagree (excludes 1, beyond it), inconclusive."""
    band = 1 + tolerance
    if 1 / band <= low and high <= band:
        return "agree"
    return "disagree" if (low > 1 or high < 1) and max(ratio, 1 / ratio) > band else "inconclusive"


def result_row(m: Measurement, **labels: Any) -> dict[str, Any]:
    """Measurement.row plus the tail (p99 only from 100 samples), the median's interval, peaks and the raw samples."""
    s, on_cuda = m.stats, "cuda" in str(labels.get("device"))
    return {**m.row(**labels), "p90_ms": s.p90 * 1e3, "p99_ms": None if s.p99 is None else s.p99 * 1e3,
            "max_ms": s.max * 1e3, "ci95_low_ms": s.ci95_low * 1e3, "ci95_high_ms": s.ci95_high * 1e3,
            "ci_coverage": s.ci_coverage, "peak_rss_mib": m.peak_rss_bytes / MIB,
            "working_rss_mib": m.peak_rss_delta_bytes / MIB,
            "cuda_alloc_mib": m.peak_cuda_allocated_bytes / MIB if on_cuda else None,
            "cpu_util_pct": m.cpu_util_pct, "gpu_util_pct": m.gpu_util_pct if on_cuda else None,
            "samples_ms": [sample * 1e3 for sample in m.samples_s]}  # compare_reports judges a change from these


def load_report(path: Path, script: str, version: int) -> dict[str, Any]:
    """A previous run's report.json of this script and report version, or a UserError saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--compare {path}: no such file (give a report.json written by {script}.py)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--compare {path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"--compare {path}: not JSON ({error.msg} at line {error.lineno})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or data.get("script") != script or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--compare {path}: not a report.json written by {script}.py")
    if data.get("report_version") != version:
        raise UserError(f"--compare {path}: report version {data.get('report_version')!r} is incompatible with "
                        f"this script's version {version}; re-run the previous version to compare")
    return data


@cache
def mann_whitney_counts(m: int, n: int) -> tuple[int, ...]:
    """How many of the C(m+n, m) orderings of two samples give U = 0, 1, ..., m*n (U: pairs with a > b)."""
    if m == 0 or n == 0:
        return (1,)
    counts = [0] * (m * n + 1)
    # The largest value is an a (beating all n b's: U grows by n) or a b (U unchanged).
    for u, ways in enumerate(mann_whitney_counts(m - 1, n)):
        counts[u + n] += ways
    for u, ways in enumerate(mann_whitney_counts(m, n - 1)):
        counts[u] += ways
    return tuple(counts)


def moses_rank(m: int, n: int) -> tuple[int, float]:
    """Rank k of the 95% interval [d_(k), d_(mn+1-k)] of the m*n pairwise ratios, and its real coverage."""
    if max(m, n) > MW_EXACT_MAX:  # normal approximation of U with continuity correction
        sigma = math.sqrt(m * n * (m + n + 1) / 12)
        k = max(1, math.floor(m * n / 2 - Z95 * sigma + 0.5))
        below = 0.5 * math.erfc(-((k - 0.5 - m * n / 2) / sigma) / math.sqrt(2))
        return k, 1 - 2 * below
    counts, total = mann_whitney_counts(m, n), math.comb(m + n, m)
    best_k, below = 1, counts[0]
    best_coverage = 1 - 2 * below / total
    for k in range(2, m * n // 2 + 1):
        below += counts[k - 1]
        coverage = 1 - 2 * below / total
        if coverage < 0.95:
            break
        best_k, best_coverage = k, coverage
    return best_k, best_coverage


def ratio_interval(before: list[float], now: list[float]) -> tuple[float, float, float, float]:
    """now / before: (ratio of the medians, 95% interval low and high, the interval's real coverage)."""
    a, b = np.asarray(before, dtype=float), np.asarray(now, dtype=float)
    if a.size == 0 or b.size == 0 or (a <= 0).any() or (b <= 0).any():
        raise ValueError("need positive samples on both sides")
    pairwise = np.sort((b[None, :] / a[:, None]).ravel())
    k, coverage = moses_rank(a.size, b.size)
    estimate = float(np.median(b) / np.median(a))
    return estimate, float(pairwise[k - 1]), float(pairwise[pairwise.size - k]), coverage


def verdict(low: float, high: float, coverage: float, band: float = RUN_BAND) -> str:
    """Now against before: "slower" / "faster" when the whole interval lies beyond the run band, "run-to-run noise"
    when it lies inside it, else "inconclusive"."""
    if coverage < MIN_COVERAGE:
        return "too few samples"
    if low > 1 + band:
        return "slower"
    if high < 1 / (1 + band):
        return "faster"
    if 1 / (1 + band) <= low and high <= 1 + band:
        return WITHIN_NOISE
    return "inconclusive"


def run_band(ratios: list[float]) -> float:
    """The band a row's now/before interval must clear: RUN_BAND, widened to RUN_SPREAD_Z robust sds of how far the
    shared rows moved when there are at least MIN_ROWS_FOR_SPREAD of them."""
    if len(ratios) < MIN_ROWS_FOR_SPREAD:
        return RUN_BAND
    spread = 1.4826 * float(np.median(np.abs(np.log(ratios))))
    return max(RUN_BAND, math.exp(RUN_SPREAD_Z * spread) - 1)


def _calibration_samples(calibration: dict[str, Any], when: str) -> list[float]:
    """Matmul seconds of one calibration point; reports without raw timings give their median as one sample."""
    return _point_samples(calibration.get(when) or {})


def _point_samples(point: dict[str, Any]) -> list[float]:
    """Matmul seconds of a calibration point (its median as one sample when the raw timings are missing)."""
    if point.get("matmul_samples_s"):
        return list(point["matmul_samples_s"])
    gflops = point.get("matmul_gflops")
    return [1.0 / gflops] if gflops else []


@dataclass
class MachineCheck:
    """How much slower the machine was now than before (calibration matmul time ratio), and drift within runs."""

    factor: float | None  # > 1: the machine was slower now; None: a report has no calibration
    low: float | None = None
    high: float | None = None
    coverage: float | None = None
    differs: bool = False
    drifted: bool = False  # the calibration moved between the start and end of a run
    lines: list[str] = field(default_factory=list)


def _material(estimate: float, band: float = MACHINE_BAND) -> bool:
    """True when a ratio is further from 1 than the band in either direction."""
    return abs(math.log(estimate)) > math.log(1 + band)


def _differs(estimate: float, low: float, high: float, band: float = MACHINE_BAND) -> bool:
    """True when the interval excludes 1 and the estimate is beyond the band."""
    return (low > 1 or high < 1) and _material(estimate, band)


def _gflops(samples: list[float]) -> float:
    """GFLOP/s of the calibration matmul from its median time."""
    return 2 * MATMUL_SIZE**3 / float(np.median(samples)) / 1e9


def machine_check(before: dict[str, Any], now: dict[str, Any], band: float = MACHINE_BAND) -> MachineCheck:
    """Compare the two runs' calibration (start and end pooled), and each run's start against its later checks.

    A check counts as drift only beyond `band`, the band every row verdict must clear: a row moved by a smaller drift
    cannot clear it. (A/A pairs of 04 --quick on a shared VM: its 7-call calibration swung 1.3-1.9x within quiet
    runs, so drift at MACHINE_BAND withheld all 15 pairs, while the rows' own band (0.24-1.47 there) kept the
    verdicts from those pairs to 2 false in 255.)"""
    pooled = [_calibration_samples(c, "start") + _calibration_samples(c, "end") for c in (before, now)]
    if not pooled[0] or not pooled[1]:
        return MachineCheck(None, lines=["a report has no calibration: machine state cannot be checked, so the "
                                         "verdicts below compare raw times"])
    factor, low, high, coverage = ratio_interval(pooled[0], pooled[1])
    check = MachineCheck(factor, low, high, coverage)
    for name, calibration in (("the earlier run", before), ("this run", now)):
        start = _calibration_samples(calibration, "start")
        later = [samples for samples in [*map(_point_samples, calibration.get("sections") or []),
                                         _calibration_samples(calibration, "end")] if samples]
        moved = [samples for samples in later if start and _differs(*ratio_interval(start, samples)[:3], band)]
        if moved:
            furthest = max(moved, key=lambda samples: abs(math.log(ratio_interval(start, samples)[0])))
            check.drifted = True
            check.lines.append(
                f"the machine changed during {name}: calibration matmul went from {_gflops(start):.1f} GFLOP/s at "
                f"its start to {_gflops(furthest):.1f} at a later check ({len(moved)} of {len(later)} checks moved "
                f"beyond +-{band:.0%}), "
                "so part of that run's rows ran on another machine state than the rest: no row gets a "
                "faster/slower verdict")
    # A run whose machine changed between its start and end is not comparable whatever the pooled factor says: an
    # A/A pair of 04 --quick whose second run slowed 3x for its last sections alone gave 4 false "slower" rows.
    check.differs = _differs(factor, low, high) or check.drifted
    if _differs(factor, low, high) or (check.drifted and _material(factor)):
        slower, how = ("this run", factor) if factor > 1 else ("the earlier run", 1 / factor)
        check.lines.insert(0, (
            f"the machine ran {how:.1f}x slower during {slower} (calibration matmul {_gflops(pooled[0]):.1f} GFLOP/s "
            f"before, {_gflops(pooled[1]):.1f} now; time ratio now/before {factor:.2f}, interval {low:.2f}-{high:.2f})"
            f": code changes cannot be told apart from machine state, and one factor cannot undo it (a matmul on two "
            "threads slows differently from a tokenizer on one), so the rows below get no faster/slower verdict; "
            f"their times normalised by {factor:.2f} are shown as information only"))
    return check


def _model_sources(report: dict[str, Any]) -> dict[str, set[str]]:
    """Each role's models in a report as "name (source)" strings, to spot a model that changed between runs."""
    sources: dict[str, set[str]] = {}
    for model in report.get("models", []):
        sources.setdefault(model.get("role") or model.get("name"), set()).add(f"{model.get('name')} "
                                                                               f"({model.get('source')})")
    return sources


def environment_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each environment difference between two reports, as "what: before -> now" (versions, device, CPU, models)."""
    old, new = before.get("environment", {}), now.get("environment", {})
    changes = [f"{label}: {old.get(key)} -> {new.get(key)}" for key, label in ENVIRONMENT.items()
               if old.get(key) != new.get(key)]
    old_models, new_models = _model_sources(before), _model_sources(now)
    for role in sorted(set(old_models) & set(new_models)):
        if old_models[role] != new_models[role]:
            changes.append(f"model for {role}: {', '.join(sorted(old_models[role]))} -> "
                           f"{', '.join(sorted(new_models[role]))}")
    return changes


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a measurement across runs: its section and labels."""
    return tuple(row.get(name) for name in ROW_KEY)


@dataclass
class RowChange:
    """One shared measurement: medians before and now, the raw and normalised now/before ratios, the verdict."""

    key: dict[str, Any]
    before_ms: float
    now_ms: float
    runs: str
    ratio: float
    low: float
    high: float
    coverage: float
    normalised_ratio: float
    normalised_low: float
    normalised_high: float
    verdict: str
    basis: str  # "raw": the verdict is on raw times; "withheld": the machine changed, so there is no verdict


def row_change(before: dict[str, Any], now: dict[str, Any], factor: float | None, machine_changed: bool,
               band: float = RUN_BAND) -> RowChange:
    """The change of one measurement from both runs' samples; CPU rows also normalised by the machine factor, as
    information. When the machine changed, the verdict is withheld."""
    old, new = before["samples_ms"], now["samples_ms"]
    ratio, low, high, coverage = ratio_interval(old, new)
    scale = factor if factor and str(now.get("device", "cpu")).startswith("cpu") else 1.0
    said = NOT_COMPARABLE if machine_changed else verdict(low, high, coverage, band)
    return RowChange({name: now.get(name) for name in ROW_KEY if now.get(name) is not None},
                     float(np.median(old)), float(np.median(new)), f"{len(old)}/{len(new)}", ratio, low, high,
                     coverage, ratio / scale, low / scale, high / scale, said,
                     "withheld" if machine_changed else "raw")


@dataclass
class RunComparison:
    """Everything --compare found: machine, environment, per-measurement changes, unmatched measurements."""

    machine: MachineCheck
    environment: list[str]
    changes: list[RowChange]
    only_before: int
    only_now: int
    band: float = RUN_BAND  # faster/slower needs the whole interval beyond +-band

    def counts(self) -> dict[str, int]:
        """How many rows got each verdict."""
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.verdict] = counts.get(change.verdict, 0) + 1
        return counts

    def table(self) -> list[dict[str, Any]]:
        """Every row in full: labels, medians, raw and normalised now/before with intervals, coverage, verdict."""
        return [{**c.key, "before_ms": c.before_ms, "now_ms": c.now_ms, "runs": c.runs, "raw_x": c.ratio,
                 "raw_interval": f"{c.low:.2f}-{c.high:.2f}", "normalised_x": c.normalised_ratio,
                 "normalised_interval": f"{c.normalised_low:.2f}-{c.normalised_high:.2f}",
                 "coverage": c.coverage, "verdict": c.verdict, "verdict_on": c.basis} for c in self.changes]

    def columns(self) -> list[str]:
        """The console table's columns: with verdicts, or (machine changed) raw and normalised side by side."""
        return WITHHELD_COLUMNS if self.machine.differs else TABLE_COLUMNS

    def console_table(self) -> list[dict[str, Any]]:
        """What fits 120 columns: what was measured, both medians, the ratio the verdict is on and the verdict; or,
        when verdicts are withheld, the raw and the normalised ratio."""
        rows = []
        for c in self.changes:
            batch = f" [batch {c.key['batch']}]" if c.key.get("batch") is not None else ""
            row = {"measurement": _cut(f"{c.key.get('measurement')}{batch}", CELL_WIDTHS["measurement"]),
                   "model": _cut(str(c.key.get("model", "-")), CELL_WIDTHS["model"]),
                   "before": c.before_ms, "now": c.now_ms}
            raw = f"{c.ratio:.2f}x [{c.low:.2f}-{c.high:.2f}]"
            if self.machine.differs:
                row.update({"raw now/before": raw, "normalised": f"{c.normalised_ratio:.2f}x [{c.normalised_low:.2f}-"
                                                                 f"{c.normalised_high:.2f}]"})
            else:
                row.update({"now/before": raw, "verdict": c.verdict})
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for report.json."""
        return {"machine": asdict(self.machine), "environment_changes": self.environment, "counts": self.counts(),
                "band": self.band, "only_before": self.only_before, "only_now": self.only_now,
                "comparison": self.table()}


def _cut(text: str, width: int) -> str:
    """text, or its first width - 3 characters and "..." when it is longer."""
    return text if len(text) <= width else text[:width - 3] + "..."


def compare_reports(before: dict[str, Any], now: dict[str, Any]) -> RunComparison:
    """Compare every measurement with samples in both reports, after checking the machine and the environment."""
    old_rows = {row_key(row): row for row in before.get("rows", []) if row.get("samples_ms")}
    new_rows = {row_key(row): row for row in now.get("rows", []) if row.get("samples_ms")}
    shared = [key for key in new_rows if key in old_rows]
    band = run_band([float(np.median(new_rows[key]["samples_ms"]) / np.median(old_rows[key]["samples_ms"]))
                     for key in shared])
    machine = machine_check(before.get("calibration", {}), now.get("calibration", {}), max(MACHINE_BAND, band))
    changes = [row_change(old_rows[key], new_rows[key], machine.factor, machine.differs, band) for key in shared]
    return RunComparison(machine, environment_changes(before, now), changes,
                         len(old_rows) - len(shared), len(new_rows) - len(shared), band)


def print_comparison(comparison: RunComparison, title: str) -> None:
    """What a reader sees first: the machine and environment lines, then every shared measurement and the tally."""
    for line in comparison.machine.lines:
        say(f"[machine] {line}")
    print("[environment] " + ("changed since the earlier run, a likely cause of any difference below: " +
                              "; ".join(comparison.environment) if comparison.environment else
                              "same versions, device, threads, CPU, model sources and --quick as the earlier run"))
    basis = "raw and normalised by the calibration" if comparison.machine.differs else "raw"
    print_table(comparison.console_table(), comparison.columns(), title=f"{title}: medians in ms; now/before {basis}, "
                "with its Moses interval (95% where the samples allow) from both runs' raw samples; every column in "
                "report.json")
    unmatched = f"{comparison.only_before} only in the earlier run, {comparison.only_now} only in this one"
    if comparison.machine.differs:
        say(f"{len(comparison.changes)} shared measurements: verdicts withheld, because the machine changed beyond "
            "its own noise between or during the runs (see [machine] above). Read the raw column: it is what the "
            "two runs timed; the normalised one assumes every row moved as the calibration matmul did, which one "
            "factor cannot promise, so neither is a verdict. Rerun both on a quiet machine to compare code. "
            f"{unmatched}")
    else:
        print_band(comparison, unmatched)


def print_band(comparison: RunComparison, unmatched: str) -> None:
    """The verdict tally, the band the verdicts needed and why, and a warning when most rows moved together."""
    say(f"{len(comparison.changes)} shared measurements, verdicts on raw times: " +
        ", ".join(f"{count} {verdict}" for verdict, count in sorted(comparison.counts().items())) + f"; {unmatched}")
    ratios = [change.ratio for change in comparison.changes]
    if comparison.band > RUN_BAND:
        say(f"faster/slower needs the whole interval beyond +-{comparison.band:.0%}: whole runs move against each "
            f"other, and the shared rows moved this much between these two (typical change "
            f"{math.exp(float(np.median(np.abs(np.log(ratios))))):.2f}x either way), so only a row that moved "
            "clearly more than the others gets a verdict")
    else:
        say(f"faster/slower needs the whole interval beyond +-{RUN_BAND:.0%}: each interval comes from one run's "
            "samples, and whole runs on a quiet machine differ by up to that much")
    shift = math.exp(float(np.median(np.log(ratios)))) if ratios else 1.0
    if abs(math.log(shift)) > math.log(1 + RUN_BAND):
        say(f"most rows moved together ({'slower' if shift > 1 else 'faster'}, median now/before {shift:.2f}x) "
            "while the calibration matmul did not: a change that moves everything (threads, versions) and a busier "
            "machine look the same here; rerun both on a quiet machine before acting on it")


def draw_comparison(comparison: RunComparison, out_dir: Path) -> Path:
    """compare.png: now/before per measurement with its interval, raw and normalised, the biggest change on top."""
    changes = sorted(comparison.changes, key=lambda c: abs(math.log(c.ratio)))
    counts = comparison.counts()
    decided = counts.get("faster", 0) + counts.get("slower", 0)
    title = ("Not comparable: the machine changed between or during the runs (ratios shown as information)"
             if comparison.machine.differs else
             f"{decided} of {len(changes)} measurements moved beyond run-to-run noise (+-{comparison.band:.0%}, shaded)")
    fig, ax = plots.figure(title,
                           "median now / median before (log scale; right of 1 = slower now)", "measurement",
                           size=(11, 1.8 + 0.32 * len(changes)))
    y = np.arange(len(changes))
    for offset, marker, kind, values in (
            (-0.17, "o", "raw", [(c.ratio, c.low, c.high) for c in changes]),
            (0.17, "s", "normalised by the calibration",
             [(c.normalised_ratio, c.normalised_low, c.normalised_high) for c in changes])):
        v = np.asarray(values)
        used = ", the verdicts" if kind == "raw" and not comparison.machine.differs else ", information only"
        ax.errorbar(v[:, 0], y + offset, xerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], fmt=marker, capsize=3,
                    label=f"{kind} with interval{used}")
    ax.axvline(1, color="grey", linewidth=1)
    if not comparison.machine.differs:
        ax.axvspan(1 / (1 + comparison.band), 1 + comparison.band, color="grey", alpha=0.12, linewidth=0)
    plots.log_x(ax)
    ax.set_ylim(-1.6, len(changes) - 0.4)  # room below the rows for the legend
    ax.set_yticks(y, [f"{c.key.get('measurement')} [{c.key.get('batch') or c.key.get('device')}]: {c.verdict}"[:80]
                      for c in changes], fontsize=7)
    ax.legend(fontsize=8, loc="lower right")
    return plots.save(fig, out_dir, "compare")
