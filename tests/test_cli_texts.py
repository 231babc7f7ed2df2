"""The option and section helpers (common.cli), text helpers (common.texts) and shared chart helpers (common.plots)."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import is_png

from common import cli, plots, texts
from common.errors import UserError


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word, plus [CLS] and [SEP]."""

    model_max_length = 5

    def __call__(self, text: str, verbose: bool = True) -> dict:
        return {"input_ids": [101, *range(len(text.split())), 102]}


def parse(*argv: str):
    parser = cli.base_parser("test")
    cli.add_text_options(parser)
    return parser.parse_args(list(argv))


def test_user_texts_come_from_both_options_stripped_without_blank_lines(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufeffilk satır\n\n   \n  second line  \n".encode("utf-8"))  # a BOM, as Notepad writes
    assert cli.read_user_texts(parse("--text", " one ", "--text", "two", "--text-file", str(path))) == [
        "one", "two", "ilk satır", "second line"]
    assert cli.read_user_texts(parse()) is None  # neither option: the lesson uses its own texts


@pytest.mark.parametrize("write, message", [
    (None, "no such file"),
    (b"\n  \n", "no text to work on"),
    (b"ok\n\xff\xfe\n", "is not UTF-8 text (byte 0xff at offset 3)"),
])
def test_bad_user_text_files_are_one_line_errors(tmp_path, write, message):
    path = tmp_path / "texts.txt"
    if write is not None:
        path.write_bytes(write)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        cli.read_user_texts(parse("--text-file", str(path)))
    assert "\n" not in str(error.value)


def test_shorten_flattens_whitespace_and_marks_the_cut():
    assert texts.shorten("a  b\n c") == "a b c"
    assert texts.shorten("abcdefghij", width=6) == "abcde…" and len(texts.shorten("x" * 100, 38)) == 38
    assert texts.shorten(" \n ") == "(empty)"


def test_report_truncation_reads_the_limit_from_the_tokenizer(capsys):
    rows = texts.report_truncation(WordTokenizer(), ["three short words", "one two three four five six"])
    assert rows == [{"text": "one two three four five six", "chars": 27, "tokens": 8, "kept": 5}]
    assert "the model reads the first 5 (38% ignored)" in capsys.readouterr().out
    assert texts.report_truncation(WordTokenizer(), ["one two three four five six"], limit=8) == []


@pytest.mark.parametrize("text, decoded, unknown, truncated, lost", [
    ("Hello, world.", "Hello, world.", 0, False, "-"),
    ("Hello, world.", "hello, world.", 0, False, "lower-cased"),
    ("Çay içtik", "cay ictik", 0, False, "lower-cased, accents stripped"),
    ("Great 🤗", "great [UNK]", 1, True, "1 [UNK] (characters dropped), truncated"),  # [UNK] keeps capitals
    ("it's fine", "it ' s fine", 0, False, "spacing around punctuation"),
])
def test_round_trip_losses_name_what_came_back_different(text, decoded, unknown, truncated, lost):
    assert texts.round_trip_losses(text, decoded, unknown, truncated) == lost


def test_grouped_bars_place_series_side_by_side_and_mark_missing_values():
    fig, ax = plt.subplots()
    plots.grouped_bars(ax, ["a", "b"], [("ours", [1.0, None]), ("theirs", [3.0, 4.0])], missing="not here")
    bars = [(round(p.get_x() + p.get_width() / 2, 3), p.get_height()) for p in ax.patches]
    assert bars == [(-0.2, 1.0), (0.2, 3.0), (1.2, 4.0)]  # no bar at 0.8, where ours is None
    (note,) = ax.texts
    assert note.get_text() == "not here" and note.xy == pytest.approx((0.8, 4.0))  # on top of the group's bars
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours", "theirs"]
    plt.close(fig)
    fig, ax = plt.subplots()
    plots.grouped_bars(ax, ["a", "b"], [("ours", [1.0, None]), ("theirs", [3.0, 4.5])], value_format="%.1f")
    assert sorted(t.get_text() for t in ax.texts) == ["1.0", "3.0", "4.5"]  # one label per drawn bar
    plt.close(fig)


def test_lines_by_draws_one_line_per_group_with_its_intervals_on_a_log2_axis():
    rows = [{"n": 1, "v": 1.0, "lo": 0.9, "hi": 1.2, "b": 1}, {"n": 4, "v": 2.0, "lo": 1.5, "hi": 2.5, "b": 1},
            {"n": 1, "v": 3.0, "lo": 3.0, "hi": 3.0, "b": 8}]
    fig, ax = plt.subplots()
    plots.lines_by(ax, rows, "n", "v", lambda row: f"batch {row['b']}", ("lo", "hi"))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["batch 1", "batch 8"]
    first, second = ax.containers
    assert list(first.lines[0].get_xdata()) == [1, 4] and list(second.lines[0].get_ydata()) == [3.0]
    (caps,) = first.lines[2]  # the vertical error segments: from low to high around each point
    assert [tuple(segment[:, 1]) for segment in caps.get_segments()] == [(0.9, 1.2), (1.5, 2.5)]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [1, 4]
    plt.close(fig)
    fig, ax = plt.subplots()
    plots.lines_by(ax, rows, "n", "v", lambda row: "all")  # no interval: plain lines, no error bars
    assert ax.containers[0].lines[2] == () and list(ax.containers[0].lines[0].get_ydata()) == [1.0, 2.0, 3.0]
    plt.close(fig)


def test_annotated_heatmap_writes_every_value_in_its_cell():
    fig, ax = plt.subplots()
    plots.annotated_heatmap(fig, ax, [[1.0, 0.25], [0.25, 1.0]], ["S1", "S2"], ["S1: x", "S2: y"], "cosine")
    assert [(t.get_position(), t.get_text()) for t in ax.texts] == [
        ((0, 0), "1.00"), ((1, 0), "0.25"), ((0, 1), "0.25"), ((1, 1), "1.00")]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S1: x", "S2: y"]
    assert ax.texts[1].get_color() == "white" and ax.texts[0].get_color() == "black"  # readable on dark cells
    plt.close(fig)


def test_chart_draws_on_a_fresh_axis_and_saves_a_png(tmp_path):
    seen = SimpleNamespace(data=None)

    def draw(ax, values):
        seen.data = values
        ax.plot(values)
        ax.set(title="t", xlabel="x (units)", ylabel="y (units)")

    path = plots.chart(tmp_path, "line", draw, [1, 2, 3])
    assert path == tmp_path / "line.png" and is_png(path) and seen.data == [1, 2, 3]
    assert plots.chart(tmp_path / "line.png" / "below-a-file", "x", draw, [1]) is None  # unsaved, said, no crash


def test_run_sections_runs_the_chosen_ones_in_order_and_shares_results(tmp_path):
    from common.report import Report

    def first(ctx, scale, results):
        """Why the first."""
        return {"value": scale}

    def second(ctx, scale, results):
        """Why the second."""
        return {"value": results["first"]["value"] * 2}  # reads an earlier section's result

    def skipped(ctx, scale, results):
        """Never chosen."""
        raise AssertionError("ran a section --only left out")

    ctx = SimpleNamespace(report=Report("05_example", tmp_path, {}))
    sections = {"first": ("1. First", first), "skipped": ("2. Skipped", skipped), "second": ("3. Second", second)}
    results = cli.run_sections(ctx, sections, 21, only=["second", "first"], results={})
    assert results == {"first": {"value": 21}, "second": {"value": 42}}
    assert list(ctx.report.sections) == ["1. First", "3. Second"]


def test_build_each_skips_what_cannot_run_and_says_why(tmp_path):
    from common.report import Report

    ctx = cli.Context(SimpleNamespace(quick=True, source="bundled"), torch.device("cpu"), tmp_path,
                      Report("05_example", tmp_path, {}))

    def broken() -> None:
        raise ValueError("no kernel\nlong trace")

    built = ctx.build_each("toy", {"ok": lambda: 3, "absent": lambda: 4, "broken": broken},
                           lambda key: "not installed" if key == "absent" else None, check=lambda model: model * 2,
                           labels={"ok": "the ok one"})
    assert list(built) == ["ok"] and built["ok"]["model"] == 3 and built["ok"]["output"] == 6
    assert ctx.report.skipped == {"toy absent": "not installed", "toy broken": "ValueError: no kernel"}


def test_documentation_paragraphs_are_real_prose_of_mixed_length_and_stable():
    paragraphs = texts.documentation_paragraphs(512)
    assert len(paragraphs) == len(set(paragraphs)) == 512  # distinct: repeats would flatter caches
    assert paragraphs == texts.documentation_paragraphs(512)  # the same every call
    words = sorted(len(p.split()) for p in paragraphs)
    assert words[0] >= 5 and words[len(words) // 2] >= 15 and words[-1] >= 150  # short, typical and long ones
    assert not any(">>>" in p or "\n" in p for p in paragraphs)  # no doctests; one line each
    assert texts.documentation_paragraphs(4)[0] == paragraphs[0]  # evenly spaced from the first
    with pytest.raises(ValueError):
        texts.documentation_paragraphs(100_000)


def test_context_once_builds_a_key_once_per_run_until_forgotten(tmp_path):
    from common.report import Report

    ctx = cli.Context(SimpleNamespace(quick=True, source="bundled"), torch.device("cpu"), tmp_path,
                      Report("05_example", tmp_path, {}))
    builds = []

    def build() -> object:
        builds.append(object())
        return builds[-1]

    first = ctx.once(("model", "a"), build)
    assert ctx.once(("model", "a"), build) is first and len(builds) == 1  # a later section reuses the same model
    assert ctx.once(("model", "b"), build) is not first and len(builds) == 2
    ctx.forget_loaded()  # before a memory measurement: every kept model is let go
    assert ctx.once(("model", "a"), build) is not first and len(builds) == 3


def test_load_reports_of_unused_heads_are_dropped_but_missing_weights_still_show(caplog):
    import logging

    cli.quiet_transformers()
    cli.quiet_transformers()  # a second lesson in the same process adds no second filter
    logger = logging.getLogger("transformers.modeling_utils")
    assert sum(isinstance(f, cli._UnusedHeadsOnly) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        logger.warning("BertModel LOAD REPORT from: x\ncls.predictions.bias | UNEXPECTED")
        logger.warning("BertModel LOAD REPORT from: y\nencoder.layer.0.weight | MISSING")
        logger.warning("some other warning")
    assert [r.getMessage().split("\n")[0] for r in caplog.records] == ["BertModel LOAD REPORT from: y",
                                                                       "some other warning"]
