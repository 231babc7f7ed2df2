"""common.paper: the article built from a recorded 04 report.json; every number in it is one the run recorded."""
from __future__ import annotations

import copy
import csv
import io
import json
import re
import shutil
import subprocess

import pytest

from common import paper, plots
from common.report import rows_to_csv
from conftest import ROOT

RECORDED = json.loads((ROOT / "tests" / "data" / "report_04_quick.json").read_text())


def leaves(value, found: set[str]) -> set[str]:
    """Every number the report holds, as the article may write it (four significant figures or as stored), and
    every number inside its strings (versions, shapes, reasons)."""
    if isinstance(value, dict):
        for item in value.values():
            leaves(item, found)
    elif isinstance(value, list):
        for item in value:
            leaves(item, found)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        found |= {paper.number(value), str(value)}
    else:
        found |= set(re.findall(r"\d+(?:\.\d+)*", str(value)))
    return found


def body(tex: str) -> str:
    """The article's text: between \\begin{document} and \\end{document}, without layout lines (widths)."""
    text = tex.split(r"\begin{document}")[1].split(r"\end{document}")[0]
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith((r"\begin{minipage}", r"\includegraphics", r"\begin{tabular}")))


def tables(tex: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each booktabs table as (header cells, body rows of cells)."""
    found = []
    for block in re.findall(r"\\toprule\n(.*?)\\bottomrule", tex, re.S):
        lines = [line.removesuffix(r" \\") for line in block.splitlines() if line != r"\midrule"]
        found.append((lines[0].split(" & "), [line.split(" & ") for line in lines[1:]]))
    return found


def test_every_timed_row_of_the_article_is_a_row_of_results_csv():
    tex = paper.latex(paper.build(RECORDED))
    csv_rows = list(csv.DictReader(io.StringIO(rows_to_csv(RECORDED["rows"]))))
    checked = 0
    for header, rows in tables(tex):
        if "Median (ms)" not in header:
            continue
        at = header.index("Median (ms)")
        for cells in rows:
            low, high = (float(x) for x in cells[at + 1].strip("[]").split(", "))
            match = [row for row in csv_rows if row["p50_ms"] and
                     float(cells[at]) == pytest.approx(float(row["p50_ms"]), rel=1e-3)]
            assert match, cells
            row = match[0]
            assert low == pytest.approx(float(row["ci95_low_ms"]), rel=1e-3)
            assert high == pytest.approx(float(row["ci95_high_ms"]), rel=1e-3)
            assert float(cells[at + 2]) == pytest.approx(float(row["items_per_s"]), rel=1e-3)
            checked += 1
    timed_sections = {"3. Task benchmarks", "4. Batch-size sweep", "6. The course notes' table, reproduced"}
    contest = {row["workload"] for row in RECORDED["rows"] if row["section"] == "7. What you would ship"}
    assert contest  # the contest's held-out half: one row per configuration
    assert checked == len(contest) + sum(row["section"] in timed_sections and row.get("ci95_low_ms") is not None
                                         for row in RECORDED["rows"])


def test_every_decimal_number_in_the_article_comes_from_the_report():
    recorded = leaves(RECORDED, set())
    for document in (body(paper.latex(paper.build(RECORDED))), paper.markdown(paper.build(RECORDED))):
        decimals = re.findall(r"(?<![\w.])\d+\.\d+(?:\.\d+)*", document)
        assert decimals
        assert [value for value in decimals if value not in recorded] == []


def test_the_abstract_states_three_findings_with_their_intervals():
    doc = paper.build(RECORDED)
    bar = next(bar for bar in RECORDED["bars"] if bar["bar"] == "recipe vs best peer runtime")
    assert f"{paper.number(bar['value'])}x {paper.interval(bar['low'], bar['high'])}" in doc.abstract
    notes = RECORDED["sections"]["6. The course notes' table, reproduced"]["distilbert_vs_bert"]["CPU"]
    assert "(1)" in doc.abstract and "(2)" in doc.abstract and "(3)" in doc.abstract
    assert f"{paper.number(notes['ours'])}x {paper.interval(*notes['ours_interval'])}" in doc.abstract
    knee = RECORDED["sections"]["4. Batch-size sweep"]["encoder"]["knee_batch"]
    assert f"at batch {knee}," in doc.abstract
    assert RECORDED["environment"]["cpu"] in doc.abstract


def test_limitations_name_the_twins_the_skips_and_the_machines_spread():
    items = paper.limitations(RECORDED)
    twins = sorted(model["label"] for model in RECORDED["models"] if model["source"] == "twin")
    assert twins and all(twin in items[0] for twin in twins)
    for what in RECORDED["skipped"]:
        assert any(item.startswith("Not measured: ") and what in item for item in items)
    assert any(item.startswith("A shared machine") for item in items)
    assert items[-1].startswith("One machine")
    real = copy.deepcopy(RECORDED)
    real["models"] = [model for model in real["models"] if model["source"] != "twin"]
    assert not any(item.startswith("Twins") for item in paper.limitations(real))


def test_a_partial_report_says_so_first():
    partial = {**RECORDED, "partial": True, "interrupted": "interrupted by the user (Ctrl-C)"}
    md = paper.markdown(paper.build(partial))
    assert md.index("Partial report") < md.index("## Method")


def test_figures_are_captioned_with_the_message_saved_in_each_png(tmp_path):
    fig, ax = plots.figure("Batch 8 is the knee", "x", "y")
    ax.plot([1, 2], [1, 2])
    chart = plots.save(fig, tmp_path, "throughput_vs_batch")
    doc = paper.build({**RECORDED, "charts": [str(chart)]})
    assert "![Batch 8 is the knee](throughput_vs_batch.png)" in paper.markdown(doc)
    assert r"\caption{Batch 8 is the knee}" in paper.latex(doc)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (see the README)")
def test_the_article_compiles_with_pdflatex(tmp_path):
    charts = []
    for name in RECORDED["charts"]:
        fig, ax = plots.figure(f"the {name} chart", "x", "y")
        ax.plot([1, 2], [1, 2])
        charts.append(str(plots.save(fig, tmp_path, name.removesuffix(".png"))))
    (tmp_path / "report.tex").write_text(paper.latex(paper.build({**RECORDED, "charts": charts})))
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "report.pdf").stat().st_size > 10_000


def test_attached_report_writes_the_article_and_falls_back_to_tables_when_it_cannot(tmp_path, capsys):
    from common.report import Report

    report = Report("04_performance_measurement", tmp_path, RECORDED["environment"])
    report.rows, report.sections, report.models = RECORDED["rows"], RECORDED["sections"], RECORDED["models"]
    paper.attach(report)
    written = report.write()
    assert tmp_path / "report.tex" in written
    assert (tmp_path / "report.tex").read_text().startswith(r"\documentclass")
    assert "## Limitations" in (tmp_path / "report.md").read_text()
    report.sections = {"4. Batch-size sweep": {"encoder": "not a sweep"}}  # data the article cannot read
    report.write()
    assert "could not be built" in capsys.readouterr().err
    assert r"\toprule" in (tmp_path / "report.tex").read_text() and "## Limitations" not in (
        tmp_path / "report.md").read_text()
