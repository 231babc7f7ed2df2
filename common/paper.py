"""04's report as an article: report.tex (a self-contained LaTeX article a paper can start from) and report.md (the
same text), built from report.json's data alone, so every number in them is one the run recorded.

The document is a list of blocks (headings, paragraphs, tables, figures, lists) rendered twice; a number is written
by `number` in both, with four significant figures, as results.csv holds it.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.meter import NOISY_CV, SAME_BAND, VERDICT_WORDS
from common.plots import saved_title
from common.report import Report, latex_escape, latex_number, latex_table

TASKS = "3. Task benchmarks"
SWEEP = "4. Batch-size sweep"
NOTES = "6. The course notes' table, reproduced"
CONTEST = "7. What you would ship"
METER = "1. Meet the meter"


def number(value: float) -> str:
    """A measured number as both documents print it: four significant figures, plain digits."""
    return latex_number(value)


def interval(low: float, high: float) -> str:
    """An interval as both documents print it."""
    return f"[{number(low)}, {number(high)}]"


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # LaTeX column spec; default: first column left, the rest right


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class Document:
    title: str
    abstract: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def items(self, entries: list[str]) -> None:
        if entries:
            self.blocks.append(("items", entries))

    def table(self, table: Table) -> None:
        if table.rows:
            self.blocks.append(("table", table))

    def figures(self, figures: list[Figure]) -> None:
        if figures:
            self.blocks.append(("figures", figures))


# ----------------------------------------------------------------------------------------------- the content


def _rows(data: dict[str, Any], section: str) -> list[dict[str, Any]]:
    """The report's timed rows of one section (those with a median and its interval)."""
    return [row for row in data.get("rows", []) if row.get("section") == section and row.get("ci95_low_ms") is not None]


def findings(data: dict[str, Any]) -> list[str]:
    """The main findings, each with its interval: the contest, the encoder's knee, DistilBERT vs BERT-base, the
    instrument check (whichever the run measured), at most three."""
    sections, found = data.get("sections", {}), []
    contest = sections.get(CONTEST) or {}
    bar = next((bar for bar in data.get("bars", []) if bar.get("bar") == "recipe vs best peer runtime"), None)
    if contest.get("shipped") and contest.get("best_peer") and bar and bar.get("low") is not None:
        found.append(f"the configuration we would ship, {contest['shipped']}, ran {number(bar['value'])}x "
                     f"{interval(bar['low'], bar['high'])} as fast as the fastest other runtime keeping the fidelity "
                     f"bar, {contest['best_peer']}, on held-out texts")
    encoder = (sections.get(SWEEP) or {}).get("encoder") or {}
    if encoder.get("knee_batch"):
        knee = next(row for row in encoder["table"] if row["batch"] == encoder["knee_batch"])
        found.append(f"the encoder's throughput stopped growing beyond +-{SAME_BAND:.0%} at batch "
                     f"{encoder['knee_batch']}, {number(knee['items_per_s'])} texts/s "
                     f"{interval(knee['items_per_s_low'], knee['items_per_s_high'])}")
    cpu = ((sections.get(NOTES) or {}).get("distilbert_vs_bert") or {}).get("CPU")
    if cpu:
        found.append(f"DistilBERT ran {number(cpu['ours'])}x {interval(*cpu['ours_interval'])} as fast as BERT-base "
                     f"on the CPU ({VERDICT_WORDS[cpu['verdict']]}), where the course notes report "
                     f"{number(cpu['notes'])}x")
    meter = sections.get(METER) or {}
    if len(found) < 3 and meter.get("meter_over_timer") is not None:
        found.append(f"our meter and torch.utils.benchmark's Timer, timing the same call, gave a median ratio of "
                     f"{number(meter['meter_over_timer'])} {interval(*meter['meter_over_timer_interval'])} "
                     f"({meter['instrument_check']})")
    return found[:3]


def environment_table(data: dict[str, Any]) -> Table:
    """The machine, the software and the models' sources."""
    env = data.get("environment", {})
    rows = [["CPU", f"{env.get('cpu')}, {env.get('physical_cores')} cores / {env.get('logical_cores')} threads, "
                    f"{env.get('ram_gib')} GiB RAM"],
            ["CPU flags", ", ".join(env.get("cpu_flags") or []) or "none of those checked"],
            ["GPU", str(env.get("gpu") or "none")], ["Device", str(env.get("device"))],
            ["OS", str(env.get("platform"))], ["Threads (torch)", str(env.get("torch_threads"))],
            ["Peak memory", str(env.get("peak_rss_method"))]]
    rows.append(["Software", ", ".join(f"{name} {env[key]}" for name, key in (
        ("Python", "python"), ("torch", "torch"), ("transformers", "transformers"), ("accelerate", "accelerate"),
        ("bitsandbytes", "bitsandbytes")) if env.get(key))])
    sources: dict[str, str] = {}
    for model in data.get("models", []):
        sources.setdefault(model.get("label") or model.get("name"), model.get("source", ""))
    rows.append(["Models (source)", ", ".join(f"{name} ({source})" for name, source in sources.items())])
    return Table("The environment of this run.", ["Item", "Value"], rows, "lp{13cm}")


def timed_table(rows: list[dict[str, Any]], caption: str, label: Callable[[dict], list[str]], heads: list[str],
                unit: str = "items/s", align: str = "") -> Table:
    """Rows with their median, the median's interval and the throughput."""
    return Table(caption, [*heads, "Median (ms)", "95% interval (ms)", unit.capitalize()],
                 [[*label(row), number(row["p50_ms"]), interval(row["ci95_low_ms"], row["ci95_high_ms"]),
                   number(row["items_per_s"])] for row in rows], (align or "l" * len(heads)) + "rrr")


def build(data: dict[str, Any]) -> Document:
    """The article's content from a report.json's data."""
    env, sections = data.get("environment", {}), data.get("sections", {})
    machine = f"{env.get('cpu')} ({env.get('logical_cores')} threads" + (f", {env['gpu']}" if env.get("gpu") else "") + ")"
    found = findings(data)
    scope = ", batch sizes and a runtime contest" if sections.get(CONTEST) else " and batch sizes"
    abstract = (f"We timed Hugging Face Transformers inference, from model loading through four pipeline tasks"
                f"{scope}, on {machine} with torch {env.get('torch')} and transformers "
                f"{env.get('transformers')}. Each latency is the median of round-robin timed calls with an exact "
                "distribution-free 95% interval. "
                + ("Findings: " + "; ".join(f"({i}) {text}" for i, text in enumerate(found, 1)) + "." if found else ""))
    doc = Document(f"Inference performance of Transformers models on {env.get('cpu')}", abstract)
    if data.get("partial"):
        doc.paragraph(f"Partial report: the run was {data.get('interrupted') or 'interrupted'} before every section "
                      "finished; what follows is what it measured.")

    meter = sections.get(METER) or {}
    budget = (f" (here {meter['warmup']} calls, then at least {meter['min_runs']} rounds and {number(meter['budget_s'])}"
              " s per workload)") if meter.get("warmup") is not None else ""
    doc.heading("Method")
    doc.paragraph("Every workload was first called untimed (warm-up: lazy initialisation, allocator growth, cold "
                  "caches). The workloads of one comparison were then timed in round-robin rounds, one call of each "
                  "per round with the starting workload rotating, until a minimum number of rounds and a time "
                  f"budget had passed{budget}; on a GPU the clock stopped after a device synchronisation. A workload's "
                  "latency is the median of its calls, and its interval the exact distribution-free 95% interval "
                  "of the median from the order statistics (with few calls its real coverage is lower, and "
                  "recorded). A ratio between two workloads is the median of the per-round time ratios, with an "
                  "interval of the same kind: pairing by round cancels what the machine did during that round. "
                  f"A result is marked noisy when its interquartile range exceeds {NOISY_CV:.0%} of its median.")
    doc.paragraph(f"A ratio is a verdict only when its whole interval lies beyond +-{SAME_BAND:.0%}: faster or "
                  "slower. An interval inside that band is too small to matter, and a wider one is inconclusive. "
                  "Performance bars are judged by the same rule against their target.")
    if sections.get(CONTEST):
        doc.paragraph("Fidelity is the cosine similarity between a configuration's sentence embeddings and those of "
                      "sentence-transformers' encode in fp32, on texts held out from the half on which the "
                      "configuration was chosen.")
    calibration = data.get("calibration", {})
    start, end = calibration.get("start") or {}, calibration.get("end") or {}
    if start.get("matmul_gflops"):
        doc.paragraph("A float32 matrix multiplication and a memory copy were timed at the start of the run "
                      f"({number(start['matmul_gflops'])} GFLOP/s), after every section and at the end"
                      + (f" ({number(end['matmul_gflops'])} GFLOP/s)" if end.get("matmul_gflops") else "")
                      + ": they tell a slower machine from slower code, and a later run's comparison withholds its "
                      "verdicts when the machine itself moved.")
    if meter.get("meter_over_timer") is not None:
        doc.paragraph("The meter was checked against torch.utils.benchmark's Timer on the same call in alternating "
                      f"rounds: meter/Timer {number(meter['meter_over_timer'])} "
                      f"{interval(*meter['meter_over_timer_interval'])}, {meter['instrument_check']} within 5%. The "
                      f"meter's own cost was {number(meter['meter_overhead_us'])} microseconds per timed call.")

    doc.heading("Environment")
    doc.table(environment_table(data))

    doc.heading("Results")
    doc.table(timed_table(_rows(data, TASKS), "Pipeline tasks: latency per call and throughput (items per call / "
                          "median).", lambda row: [row["measurement"], row["model"]], ["Task (work per call)", "Model"],
                          align="p{4.6cm}p{4.4cm}"))
    for role, sweep in (sections.get(SWEEP) or {}).items():
        rows = [row for row in _rows(data, SWEEP) if row.get("measurement") == f"batch sweep: {role}"]
        beyond = sweep.get("beyond_knee")
        knee = (f"The knee (the smallest batch that no larger batch beats by more than {SAME_BAND:.0%} in texts/s) "
                f"is batch {sweep['knee_batch']}" if sweep.get("knee_batch") else "There is no knee in these sizes")
        if beyond:
            knee += (f"; batch {beyond['batch']} gives {number(beyond['gain'])}x its texts/s "
                     f"{interval(beyond['low'], beyond['high'])}: {beyond['verdict']}")
        doc.table(timed_table(rows, f"Batch sizes, {sweep['workload']}. {knee}.", lambda row: [str(row["batch"])],
                              ["Batch"], "texts/s"))
    # the contest's last table is its held-out half: a workload's later row replaces its choosing-half row
    held_out = list({row["workload"]: row for row in _rows(data, CONTEST)}.values())
    if held_out:
        baseline = next((row["workload"] for row in held_out if row.get("verdict") == "baseline"), "the baseline")
        doc.table(Table(f"The runtime contest on held-out texts: our recipes against the peers' runtimes. Shipped: "
                        f"{(sections.get(CONTEST) or {}).get('shipped')}. Fidelity: cosine against "
                        "sentence-transformers' encode (fp32).",
                        ["Configuration", "Median (ms)", "95% interval (ms)", "Texts/s", f"Speed-up vs {baseline}",
                         "Cosine min"],
                        [[row["workload"], number(row["p50_ms"]), interval(row["ci95_low_ms"], row["ci95_high_ms"]),
                          number(row["items_per_s"]), _speedup(row), _cosine(row)] for row in held_out],
                        "p{3.6cm}rrrrr"))
    notes = sections.get(NOTES) or {}
    if notes.get("rows"):
        ratio = "; ".join(f"{kind}: DistilBERT/BERT-base {number(r['ours'])}x {interval(*r['ours_interval'])} here, "
                          f"{number(r['notes'])}x in the notes" for kind, r in notes.get("distilbert_vs_bert", {}).items())
        doc.table(timed_table(_rows(data, NOTES), f"The course notes' table re-measured: one forward pass of "
                              f"{notes['input_shape']} tokens. {ratio}.", lambda row: [row["workload"], row["device"]],
                              ["Model", "Device"], "passes/s"))

    doc.heading("Figures")
    doc.figures([Figure(Path(chart).name, saved_title(Path(chart)) or Path(chart).stem.replace("_", " "))
                 for chart in data.get("charts", [])])

    doc.heading("Limitations")
    doc.items(limitations(data))
    return doc


def _speedup(row: dict[str, Any]) -> str:
    if row.get("verdict") == "baseline" or row.get("speedup") is None:
        return "baseline"
    return f"{number(row['speedup'])} {interval(row['speedup_low'], row['speedup_high'])}"


def _cosine(row: dict[str, Any]) -> str:
    return "--" if row.get("cos_min") in (None, "") else number(float(row["cos_min"]))


def limitations(data: dict[str, Any]) -> list[str]:
    """What this run itself knows limits its numbers."""
    found = []
    twins = sorted({model.get("label") or model["name"] for model in data.get("models", [])
                    if model.get("source") == "twin"})
    if twins:
        found.append("Twins instead of real models: " + ", ".join(twins) + " have random weights with the real "
                     "shapes, so their time and memory are the real models' but their outputs mean nothing.")
    calibration = data.get("calibration", {})
    gflops = [point["matmul_gflops"] for point in [calibration.get("start"), *calibration.get("sections", []),
                                                   calibration.get("end")] if point and point.get("matmul_gflops")]
    timed = [row for row in data.get("rows", []) if row.get("ci95_low_ms") is not None]
    if gflops:
        found.append(f"A shared machine: the calibration matmul ran between {number(min(gflops))} and "
                     f"{number(max(gflops))} GFLOP/s during the run, and {sum(bool(row.get('noisy')) for row in timed)}"
                     f" of {len(timed)} timed results were noisy (interquartile range above {NOISY_CV:.0%} of the "
                     "median).")
    missing = {**data.get("skipped", {}), **data.get("failures", {})}
    if missing:
        found.append("Not measured: " + "; ".join(f"{what} ({why})" for what, why in missing.items()) + ".")
    if data.get("environment", {}).get("quick"):
        found.append("A --quick run: fewer calls per measurement and fewer batch sizes than the full run.")
    found.append("One machine, one run: the numbers describe this machine on this day, not a population of machines.")
    return found


# ----------------------------------------------------------------------------------------------- rendering


def _tex_text(text: str) -> str:
    """Plain text as LaTeX: specials escaped, +- as the plus-minus sign, x after a number as the times sign."""
    text = latex_escape(text).replace("+-", r"$\pm$").replace("--", "-{}-")  # --quick, not an en dash
    return re.sub(r"(\d)x\b", r"\1$\\times$", text)


def latex(doc: Document) -> str:
    """The article as a self-contained LaTeX file (article class, booktabs, graphicx, geometry)."""
    lines = [r"\documentclass[10pt]{article}", r"\usepackage[margin=2cm]{geometry}", r"\usepackage{booktabs}",
             r"\usepackage{graphicx}", r"\usepackage{float}", r"\setlength{\parskip}{0.4em}",
             f"\\title{{{_tex_text(doc.title)}}}", r"\date{}", r"\begin{document}", r"\maketitle",
             r"\begin{abstract}", _tex_text(doc.abstract), r"\end{abstract}"]
    for kind, block in doc.blocks:
        if kind == "heading":
            lines.append(f"\\section{{{_tex_text(block)}}}")
        elif kind == "paragraph":
            lines += ["", _tex_text(block), ""]
        elif kind == "items":
            lines += [r"\begin{itemize}", *[f"\\item {_tex_text(item)}" for item in block], r"\end{itemize}"]
        elif kind == "table":
            align = block.align or "l" + "r" * (len(block.header) - 1)
            lines += [r"\begin{table}[H]", r"\centering", r"\small", f"\\caption{{{_tex_text(block.caption)}}}",
                      f"\\begin{{tabular}}{{{align}}}", r"\toprule",
                      " & ".join(_tex_text(head) for head in block.header) + r" \\", r"\midrule",
                      *[" & ".join(_tex_text(cell) for cell in row) + r" \\" for row in block.rows],
                      r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        elif kind == "figures":  # two to a row, a float each, so a page fills with as many rows as fit
            for start in range(0, len(block), 2):
                lines += [r"\begin{figure}[H]", r"\centering"]
                for figure in block[start:start + 2]:
                    lines += [r"\begin{minipage}[t]{0.49\linewidth}", r"\centering",
                              r"\includegraphics[width=\linewidth,height=0.24\textheight,keepaspectratio]"
                              f"{{{figure.file}}}", f"\\caption{{{_tex_text(figure.caption)}}}", r"\end{minipage}",
                              r"\hfill"]
                lines.append(r"\end{figure}")
    return "\n".join([*lines, r"\end{document}", ""])


def markdown(doc: Document) -> str:
    """The same article as Markdown."""
    lines = [f"# {doc.title}", "", f"**Abstract.** {doc.abstract}", ""]
    for kind, block in doc.blocks:
        if kind == "heading":
            lines += [f"## {block}", ""]
        elif kind == "paragraph":
            lines += [block, ""]
        elif kind == "items":
            lines += [f"- {item}" for item in block] + [""]
        elif kind == "table":
            lines += [f"*{block.caption}*", "", "| " + " | ".join(block.header) + " |",
                      "|" + "---|" * len(block.header),
                      *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows], ""]
        elif kind == "figures":
            for figure in block:
                lines += [f"![{figure.caption}]({figure.file})", "", f"*{figure.caption}*", ""]
    return "\n".join(lines)


def attach(report: Report) -> None:
    """Make report.md and report.tex the article each time the report is written (after every section, so a
    partial run's article has what it measured). Should the article fail, report.md keeps Report's plain tables and
    report.tex holds the timed rows as one booktabs table: a report writer must never cost a run its numbers."""
    plain_markdown = report.markdown

    def documents(data: dict[str, Any]) -> dict[str, str]:
        try:
            document = build(data)
        except Exception as error:  # noqa: BLE001  (a bug here must not lose the measurements: say it, fall back)
            print(f"[report] the article could not be built ({type(error).__name__}: {error}); report.md and "
                  "report.tex hold the plain tables", file=sys.stderr)
            return {"report.md": plain_markdown(data), "report.tex": latex_table(data["rows"], report.latex_caption())}
        return {"report.md": markdown(document), "report.tex": latex(document)}

    report.documents = documents
