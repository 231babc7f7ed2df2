"""Console tables and atomic JSON/CSV/Markdown reports that always carry the environment they were measured in."""
from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from common.calibration import calibrate
from common.errors import UserError, first_line
from common.meter import Comparison, rounds_to_settle, settle_text

REPORT_VERSION = 1
T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    """Turn dataclasses, numpy and torch values into plain JSON types; NaN/inf become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (np.generic,)):
        return to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, (torch.dtype, torch.device, torch.Size, Path)):
        return str(value) if not isinstance(value, torch.Size) else list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write(path: Path, text: str) -> Path:
    """Write text to a temp file beside path, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return path


def format_value(value: Any) -> str:
    """A compact human form: 3 significant figures for floats, thousands separators for ints."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


# Kept in the CSV/JSON, folded out of console tables: noise shows in the p50 cell, the interval in the speedup cell.
RECORD_ONLY = ("iqr_ms", "runs", "rounds", "speedup_low", "speedup_high", "noisy", "sentence", "ci95_low_ms",
               "ci95_high_ms", "ci_coverage")
WRAP = 100  # evidence sentences under a table wrap here; tables themselves stay within 120 columns


def console_cell(row: dict[str, Any], column: str) -> str:
    """One console cell: a noisy p50 reads `41.2 (! 12%)`, a speed-up `2.04x [1.91-2.16]`, a baseline's is blank."""
    value = row.get(column)
    if column == "p50_ms" and row.get("noisy") and row.get("iqr_ms") is not None and value:
        return f"{format_value(value)} (! {row['iqr_ms'] / value:.0%})"
    if column.startswith("cosine") and isinstance(value, float):  # bars sit at 0.98/0.99: 3 figures hide a miss
        return f"{value:.4f}"
    if column == "speedup" and value is not None and row.get("speedup_low") is not None:
        if row.get("verdict") == "baseline":
            return ""
        return ratio_cell(value, row["speedup_low"], row["speedup_high"])
    return format_value(value)


def ratio_cell(estimate: float, low: float, high: float) -> str:
    """A ratio with its interval as a table cell reads it: `2.04x [1.91-2.16]`."""
    return f"{estimate:.2f}x [{low:.2f}-{high:.2f}]"


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table (numbers right-aligned), without the RECORD_ONLY columns."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    columns = [column for column in columns if column not in RECORD_ONLY]
    cells = [[console_cell(row, column) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def render(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [render(columns), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, title: str | None = None) -> None:
    """Print a titled aligned table (a long title wraps)."""
    if title:
        print("\n" + wrap(title))
    print(format_table(rows, columns))


def wrap(text: str, indent: str = "") -> str:
    """A sentence wrapped at WRAP columns, continuation lines indented two more spaces; existing newlines kept."""
    return "\n".join(textwrap.fill(line, WRAP, initial_indent=indent, subsequent_indent=indent + "  ",
                                    break_on_hyphens=False, break_long_words=False) or line
                      for line in text.splitlines())


def say(text: str, indent: str = "") -> None:
    """Print an evidence sentence wrapped at WRAP columns."""
    print(wrap(text, indent))


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows of dicts as a GitHub Markdown table."""
    if not rows:
        return "_no rows_"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
LATEX_COLUMNS = ("Measurement", "Model", "Device", "Batch", "Median (ms)", "Interval (ms)", "Coverage (\\%)",
                 "Throughput (items/s)")


def latex_escape(text: Any) -> str:
    """Text with LaTeX's special characters escaped."""
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def latex_number(value: float) -> str:
    """Four significant figures, plain digits (no thousands separator, no exponent below 1e6)."""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def latex_table(rows: list[dict[str, Any]], caption: str) -> str:
    """Every row with a median and its interval (runs.result_row's keys) as a booktabs table for a paper."""
    timed = [row for row in rows if row.get("p50_ms") is not None and row.get("ci95_low_ms") is not None]
    body = [" & ".join([latex_escape(row.get("measurement") or row.get("section", "")),
                        latex_escape(row.get("model") or ""), latex_escape(row.get("device") or ""),
                        latex_escape(row.get("batch") or "--"),
                        latex_number(row["p50_ms"]),
                        f"[{latex_number(row['ci95_low_ms'])}, {latex_number(row['ci95_high_ms'])}]",
                        f"{100 * row['ci_coverage']:.0f}", latex_number(row["items_per_s"])]) + r" \\"
            for row in timed]
    return "\n".join([
        r"\begin{table}[htbp]", r"\centering", r"\small",
        f"\\caption{{{latex_escape(caption)}}}", r"\label{tab:results}",
        r"\begin{tabular}{llllrlrr}", r"\toprule", " & ".join(LATEX_COLUMNS) + r" \\", r"\midrule",
        *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def interval_status(low: float, high: float, target: float) -> str:
    """A bar's status from its interval: PASS when all of it reaches the target, MISS when none does."""
    if low >= target:
        return "PASS"
    if high < target:
        return "MISS"
    return "INCONCLUSIVE"


def performance_bar(name: str, target: str, measured: str, value: float | None, status: str) -> dict[str, Any]:
    """Print and return one performance bar: PASS, MISS or INCONCLUSIVE from its interval, REPORTED without target,
    BROKEN REFERENCE when the measurement exceeds what its reference claims is the limit."""
    if status not in ("PASS", "MISS", "INCONCLUSIVE", "REPORTED", "BROKEN REFERENCE"):
        raise ValueError(f"unknown bar status {status!r}")
    bar = {"bar": name, "target": target, "measured": measured, "value": value, "status": status}
    say(bar_line(bar))
    return bar


def bar_line(bar: dict[str, Any]) -> str:
    """One bar as printed: [STATUS] name: measured ... (target ..., or "no target: reported")."""
    target = f"(target {bar['target']})" if bar["target"] else "(no target: reported)"
    return f"[{bar['status']}] {bar['bar']}: measured {bar['measured']}  {target}"


def ratio_bar(name: str, target: str, measured: str, ratio: tuple[float, float, float], rounds: int,
              minimum: float) -> dict[str, Any]:
    """A bar on a speed ratio (estimate, low, high): its status from the interval; INCONCLUSIVE says what would settle."""
    estimate, low, high = ratio
    status = interval_status(low, high, minimum)
    if status == "INCONCLUSIVE":
        measured += "; " + settle_text(rounds_to_settle(estimate, low, high, rounds, (minimum,)),
                                       "whether it clears its target")
    return {**performance_bar(name, target, measured, estimate, status), "low": low, "high": high, "minimum": minimum}


def limit_bar(name: str, target: str, measured: str, fraction: tuple[float, float, float], rounds: int,
              minimum: float) -> dict[str, Any]:
    """A bar on a share of a limit (estimate, low, high): above 100% the reference was no limit (BROKEN REFERENCE,
    never PASS); otherwise the interval decides, as for ratio_bar."""
    estimate, low, high = fraction
    if estimate <= 1:
        return ratio_bar(name, target, measured, fraction, rounds, minimum)
    measured += ": above 100%, so the reference is not this machine's limit"
    return {**performance_bar(name, target, measured, estimate, "BROKEN REFERENCE"), "low": low, "high": high,
            "minimum": minimum}


SPEED_COLUMNS = ("workload", "p50_ms", "items_per_s", "speedup", "verdict")
HOW_TO_READ = {  # printed once per lesson, at its first table, unless the lesson taught a part itself
    "timing": "p50_ms is each row's own median time per call; `(! 12%)` flags a noisy row (interquartile range / "
              "median).",
    "ratio": "A table's workloads take turns, one call each per round (round-robin), so a busy neighbour slows them "
             "alike. speedup is how many times faster per item than the baseline row: the median of the per-round "
             "ratios, with its exact interval [95%, or lower as stated for few rounds]. verdict: faster or slower "
             "when the whole interval is beyond +-3%; within +-3% or no measurable difference when it lies inside; "
             "inconclusive when too wide.",
}
_explained: set[str] = set()


def explained(part: str) -> None:
    """Note that the lesson has taught this part of HOW_TO_READ in its own words: show() will not repeat it."""
    _explained.add(part)


def show(comparison: Comparison, baseline: str, title: str, *, extra: dict[str, dict[str, Any]] | None = None,
         columns: tuple[str, ...] = (), report: "Report | None" = None, section: str | None = None,
         bar: tuple[str, str, float] | None = None, unranked: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The one way a lesson shows a comparison: a table (each row its own median, items/s, the paired ratio against
    `baseline` with its interval, the verdict, then `columns` from `extra[workload]`), the rows recorded in the report
    under `section`, and with `bar=(name, workload, minimum)` that ratio's performance bar, printed once under it.
    `unranked` rows were timed in the same rounds for another figure and are not like-for-like with the baseline:
    they show their own median and no ratio. Returns the rows (extra merged in), for the lesson's chart."""
    legend = [text for part, text in HOW_TO_READ.items() if part not in _explained]
    if legend:
        _explained.update(HOW_TO_READ)
        say("\nHow to read the timing tables: " + " ".join(legend))
    rows = [{**row, **(extra or {}).get(row["workload"], {})} for row in comparison.rows(baseline=baseline)]
    for row in rows:
        row["sentence"] = "" if row["workload"] == baseline else comparison.sentence(row["workload"], baseline)
        if row["workload"] in unranked:
            row.update(speedup=None, speedup_low=None, speedup_high=None, verdict="-", sentence="")
    print_table(rows, [*SPEED_COLUMNS, *columns], title=f"{title}; speedup vs {baseline}")
    if report is not None:
        report.add_rows(section or report.current or title, rows)
        if bar is not None:
            name, workload, minimum = bar
            measured = f"{workload} vs {baseline}, the speedup in the table above"  # the ratio is stated once
            report.add_bar(ratio_bar(name, f">= {minimum:g}x", measured, comparison.ratio(workload, baseline),
                                     comparison.rounds, minimum))
    return rows


def _is_table(value: Any) -> bool:
    """True for a non-empty list of dicts: rendered as a table, not a value."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


class Report:
    """Results of one script run, section by section; writes report.json, report.md and results.csv."""

    def __init__(self, script: str, out_dir: Path, environment: dict[str, Any]) -> None:
        self.script = script
        self.out_dir = Path(out_dir)
        self.environment = environment
        self.sections: dict[str, Any] = {}
        self.failures: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.charts: list[str] = []
        self.bars: list[dict[str, Any]] = []  # printed once where measured; counted again only in finish's line
        self.current = ""  # the running section's title: where show() files its rows
        self.section_seconds: dict[str, float] = {}
        self.calibration: dict[str, dict[str, Any]] = {}  # "start" and "end": see common.calibration
        self.partial = False
        self.interrupted: str | None = None  # why the run stopped early: Ctrl-C or SIGTERM
        self.finished = False  # until finish(), a report on disk is the last section's checkpoint
        # more documents from the same data ({file name: text}), written beside report.json each time: 04's article
        self.documents: Callable[[dict[str, Any]], dict[str, str]] | None = None
        self.started = time.perf_counter()

    def run_section(self, title: str, why: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Print the heading and why (a docstring is fine), run the section, keep its result; failures are recorded."""
        print(f"\n{'=' * 78}\n{title}\n{'=' * 78}\n{inspect.cleandoc(why)}\n")
        self.current = title
        started = time.perf_counter()
        result = None
        try:
            result = fn(*args, **kwargs)
        except KeyboardInterrupt as stop:
            self.failures[title] = self.mark_interrupted(stop)
            self.write_partial()
            raise
        except UserError as error:
            self.failures[title] = str(error)
            print(f"[section failed] {error}")
        except Exception as error:  # one broken section must not lose the others' numbers
            self.failures[title] = f"{type(error).__name__}: {error}"
            print(f"[section failed] {type(error).__name__}: {error}")
            traceback.print_exc(limit=3)
        else:
            self.sections[title] = result
        finally:
            self.section_seconds[title] = time.perf_counter() - started
        if title not in self.failures:
            print(f"[{title}: {self.section_seconds[title]:.1f} s]")
        self.write_partial()  # a run killed later (OOM killer, SIGKILL) still leaves every finished section on disk
        return result

    def mark_interrupted(self, stop: KeyboardInterrupt) -> str:
        """Mark the report partial and remember why: Ctrl-C, SIGTERM or a closed output pipe."""
        self.partial = True
        self.interrupted = getattr(stop, "reason", "interrupted by the user (Ctrl-C)")  # Terminated, OutputClosed
        return self.interrupted

    def write_partial(self) -> None:
        """Write what was measured before the interruption; a write error is printed, never raised over it."""
        try:
            self.write()
        except (OSError, TypeError, ValueError) as error:  # a result JSON cannot hold must not end the run here
            print(f"[report] could not write the partial report: {error}", file=sys.stderr)

    def skip(self, what: str, reason: str) -> None:
        """Record and print that something was not run, and why."""
        self.skipped[what] = reason
        say(f"[skipped] {what}: {reason}")

    def skip_parts(self, what: str, parts: tuple[str, ...], reason: str) -> None:
        """Record each part of `what` as skipped for one reason, and print it as one line."""
        self.skipped.update({f"{what}: {part}": reason for part in parts})
        say(f"[skipped] {what} ({', '.join(parts)}): {reason}")

    def attempt(self, what: str, work: Callable[[], T], fails_run: bool = False) -> T | None:
        """work()'s result; if it raises, record why and return None so the next item goes on: a skip, or with
        fails_run a failure that gives the run exit code 1."""
        try:
            return work()
        except Exception as error:  # one item (a model, a variant, a task) must not cost the others their numbers
            if not fails_run:
                self.skip(what, first_line(error))
                return None
            self.failures[what] = first_line(error)
            say(f"[failed] {what}: {first_line(error)}")
            return None

    def add_rows(self, section: str, rows: list[dict[str, Any]]) -> None:
        """Append tidy measurement rows (one per measurement) for results.csv."""
        self.rows.extend({"section": section, **row} for row in rows)

    def add_model(self, model: dict[str, Any]) -> None:
        """List a loaded model's provenance once per name, source, dtype and device."""
        key = ("name", "source", "dtype", "device")
        if all(tuple(m.get(k) for k in key) != tuple(model.get(k) for k in key) for m in self.models):
            self.models.append(to_jsonable(model))

    def add_bar(self, bar: dict[str, Any]) -> dict[str, Any]:
        """Keep a performance bar (already printed where it was measured) for the report and finish's count."""
        self.bars.append(bar)
        return bar

    def add_chart(self, path: Path | None) -> None:
        """Remember a chart file so the report can list it (None: the chart could not be saved, already said)."""
        if path is not None:
            self.charts.append(str(path))

    def to_dict(self) -> dict[str, Any]:
        """The whole run as JSON-ready data."""
        return to_jsonable({
            "report_version": REPORT_VERSION,
            "script": self.script,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "partial": self.partial or not self.finished,
            "interrupted": self.interrupted or (None if self.finished else "killed or still running"),
            "wall_s": time.perf_counter() - self.started,
            "environment": self.environment,
            "calibration": self.calibration,
            "models": self.models,
            "sections": self.sections,
            "failures": self.failures,
            "skipped": self.skipped,
            "section_seconds": self.section_seconds,
            "charts": self.charts,
            "bars": self.bars,
            "rows": self.rows,
        })

    def latex_caption(self) -> str:
        """What report.tex's numbers are and the machine they were measured on."""
        env = self.environment
        return (f"{self.script}: median latency per call and the exact distribution-free interval of the median "
                f"(coverage as stated); throughput = items per call / median. Measured on {env.get('cpu')}, device "
                f"{env.get('device')}, {env.get('torch_threads')} threads, torch {env.get('torch')}, transformers "
                f"{env.get('transformers')}" + (" (--quick run)" if env.get("quick") else "") + ".")

    def markdown(self, data: dict[str, Any]) -> str:
        """A paste-able Markdown rendering: environment, models, each section's tables and scalars."""
        lines = [f"# {self.script}", ""]
        if data["partial"]:
            lines += [f"**Partial report: the run was {data['interrupted'] or 'interrupted'} before every section "
                      "finished.**", ""]
        environment = [{"key": key, "value": value} for key, value in data["environment"].items()]
        lines += ["## Environment", "", markdown_table(environment), ""]
        if data["models"]:
            lines += ["## Models", "", markdown_table(data["models"]), ""]
        for title, result in data["sections"].items():
            lines += [f"## {title}", ""]
            lines += _markdown_block(result)
        if data["failures"]:
            lines += ["## Failed sections", ""] + [f"- **{k}**: {v}" for k, v in data["failures"].items()] + [""]
        if data["skipped"]:
            lines += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in data["skipped"].items()] + [""]
        if data["bars"]:
            lines += ["## Performance bars", "", markdown_table(data["bars"], ["status", "bar", "measured", "target"]),
                      ""]
        if data["charts"]:
            lines += ["## Charts", ""] + [f"- {Path(c).name}" for c in data["charts"]] + [""]
        return "\n".join(lines)

    def write(self) -> list[Path]:
        """Write report.json, report.md and (with rows) results.csv; if the folder fails, into a fresh temp folder."""
        data = self.to_dict()
        texts = {"report.json": json.dumps(data, indent=2, allow_nan=False), "report.md": self.markdown(data)}
        if data["rows"]:
            texts["results.csv"] = rows_to_csv(data["rows"])
        if self.documents is not None:
            texts.update(self.documents(data))
        try:
            return [atomic_write(self.out_dir / name, text) for name, text in texts.items()]
        except OSError as error:  # e.g. the disk filled during the run: the measurements must survive it
            fallback = Path(tempfile.mkdtemp(prefix=f"{self.script}-report-"))
            print(f"[report] could not write to {self.out_dir} ({error.strerror or error}); "
                  f"the report goes to {fallback} instead", file=sys.stderr)
            self.out_dir = fallback  # a later write (partial, then final) lands beside it
            return [atomic_write(fallback / name, text) for name, text in texts.items()]

    def finish(self) -> int:
        """Write the reports, print where they are and the wall time; exit code 1 if any section failed."""
        if "end" not in self.calibration:  # a lesson may have taken it already, right after its last section
            self.calibration["end"] = calibrate(self.environment.get("device", "cpu"))
        self.finished = not self.partial
        paths = self.write()
        print(f"\n{'=' * 78}")
        names = [Path(path).name for path in paths + [Path(chart) for chart in self.charts]]
        say(f"wrote to {self.out_dir}: {', '.join(names)}")
        if self.bars:
            counts = {status: sum(bar["status"] == status for bar in self.bars)
                      for status in dict.fromkeys(bar["status"] for bar in self.bars)}
            print("performance bars (each printed under its table; listed in report.md): "
                  + ", ".join(f"{n} {status}" for status, n in counts.items()))
        if self.failures:
            print(f"{len(self.failures)} section(s) failed: {', '.join(self.failures)}")
        print(f"total wall time: {time.perf_counter() - self.started:.1f} s")
        return 1 if self.failures else 0


def _markdown_block(result: Any) -> list[str]:
    """A section result as Markdown lines: tables, scalars as a list, multi-line strings as code blocks."""
    if _is_table(result):
        return [markdown_table(result), ""]
    if not isinstance(result, dict):
        return [f"{format_value(result)}", ""]
    lines: list[str] = []
    scalars = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    blocks = {k: v for k, v in scalars.items() if isinstance(v, str) and "\n" in v}  # code snippets stay readable
    if len(blocks) < len(scalars):
        lines += [f"- {k}: {format_value(v)}" for k, v in scalars.items() if k not in blocks] + [""]
    for key, text in blocks.items():
        lines += [f"### {key}", "", "```", text, "```", ""]
    for key, value in result.items():
        if _is_table(value):
            lines += [f"### {key}", "", markdown_table(value), ""]
        elif isinstance(value, dict) and (block := _markdown_block(value)):
            lines += [f"### {key}", ""] + block
    return lines


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """Tidy rows as CSV text with the union of their keys as the header."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    """A CSV cell: empty for None, JSON for lists and dicts (so raw samples parse back), the value otherwise."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value
