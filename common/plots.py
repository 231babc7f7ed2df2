"""Matplotlib on the Agg backend with one house style; `save` writes a titled chart into the output folder."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter  # noqa: E402

DPI = 130
plt.rcParams.update({
    "figure.figsize": (8, 4.8),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "font.size": 10,
})


def figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] | None = None) -> tuple[Figure, Axes]:
    """A new figure with one axis, already titled and labelled (put units in the labels)."""
    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def log_y(ax: Axes) -> None:
    """A log y axis ticked at 1-2-5 steps written as plain numbers (10, 20, 50, not 2x10^1)."""
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)


def legend_outside(ax: Axes, title: str | None = None) -> None:
    """The legend to the right of the axes, where it can never cover data. It stays out of the layout, so a long
    legend widens the saved image (save() includes it) instead of squeezing the plot."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, title=title,
              title_fontsize=8).set_in_layout(False)


def log2_x(ax: Axes, values: Iterable[float]) -> None:
    """A log2 x axis ticked at exactly these values (batch sizes, thread counts, lengths), no minor ticks."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(value) for value in ticks])
    ax.minorticks_off()


def log_x(ax: Axes) -> None:
    """A log x axis ticked at 1-2-5 steps written as plain numbers (0.2, 0.5, 1, not 2x10^-1)."""
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)


def log_axes(ax: Axes) -> None:
    """Both axes logarithmic, ticked at 1-2-5 steps written as plain numbers (20, 50, 100, not 10^2)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)


def _plain_log_ticks(axis: Any) -> None:
    """Major ticks of a log axis at 1, 2 and 5 times each power of ten, labelled like 0.5, 20, 100; no minor labels."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def lines_by(ax: Axes, rows: list[dict], x: str, y: str, group: Callable[[dict], str],
             interval: tuple[str, str] | None = None, legend_title: str | None = None) -> None:
    """One line per group of rows on a log2 x axis ticked at its x values; `interval`: (low, high) keys, error bars
    (say which interval in legend_title); the legend sits outside the data."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    for label, points in groups.items():
        ys = [p[y] for p in points]
        errors = None if interval is None else [[v - p[interval[0]] for v, p in zip(ys, points)],
                                                [p[interval[1]] - v for v, p in zip(ys, points)]]
        ax.errorbar([p[x] for p in points], ys, yerr=errors, marker="o", capsize=3, label=label)
    log2_x(ax, [row[x] for row in rows])
    legend_outside(ax, legend_title)


def grouped_bars(ax: Axes, groups: list[str], series: list[tuple[str, list[float | None]]], missing: str = "",
                 value_format: str = "") -> None:
    """Side-by-side bars per group, one colour per series, with a legend; a None draws no bar (but `missing` text);
    with a value_format ("%.0f") each bar is labelled with its value."""
    positions = np.arange(len(groups))
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series):
        x = positions + (index - (len(series) - 1) / 2) * width
        present = [i for i, value in enumerate(values) if value is not None]
        bars = ax.bar(x[present], [values[i] for i in present], width=width, label=label)
        if value_format:  # "-0" for a value that rounds to nothing would read as a loss
            texts = [value_format % values[i] for i in present]
            ax.bar_label(bars, labels=[text.lstrip("-") if float(text) == 0 else text for text in texts], fontsize=7)
        for i, value in enumerate(values):
            if value is None and missing:
                top = max((v[i] for _, v in series if v[i] is not None), default=0)  # where the group's bars end
                ax.annotate(missing, (x[i], top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(positions, groups, fontsize=8)
    legend_outside(ax)


def roofline(ax: Axes, points: list[dict], peak_flops: float, bandwidth: float, roof_label: str) -> None:
    """The two roofs (bandwidth x intensity, capped at the peak) and each point (`intensity`, `flops` in FLOP/s,
    `label`), one marker per `group` (joined by a line where `joined`), on log axes with the legend below."""
    ridge = peak_flops / bandwidth
    xs = [min(p["intensity"] for p in points) / 2, ridge, max(max(p["intensity"] for p in points), ridge) * 3]
    ax.plot(xs, [min(peak_flops, bandwidth * x) / 1e9 for x in xs], color="black", linewidth=1.5, label=roof_label)
    groups: dict[str, list[dict]] = {}
    for point in points:
        groups.setdefault(point["group"], []).append(point)
    for (group, members), marker in zip(groups.items(), "osD^"):
        ax.plot([p["intensity"] for p in members], [p["flops"] / 1e9 for p in members], marker=marker,
                linestyle="-" if members[0].get("joined") else "none", label=group)
        for index, p in enumerate(members):  # labels alternate below and above: neighbours do not overprint
            ax.annotate(p["label"], (p["intensity"], p["flops"] / 1e9), textcoords="offset points",
                        xytext=(5, -10 if index % 2 == 0 else 6), fontsize=7)
    log_axes(ax)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8)  # below the axes: no point is hidden


def annotated_heatmap(fig: Figure, ax: Axes, matrix: Any, xlabels: list[str], ylabels: list[str], label: str) -> None:
    """Show a square matrix (values up to 1) as a heat-map with each value written in its cell, and a colour bar."""
    values = np.asarray(matrix, dtype=float)
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, float(values.min())), vmax=1.0)
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.grid(False)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=label)


def chart(out_dir: Path, name: str, draw: Callable[..., None], *data: Any) -> Path | None:
    """Call draw(ax, *data) on a new figure with one axis (draw titles and labels it), then save it like save()."""
    fig, ax = plt.subplots()
    draw(ax, *data)
    return save(fig, out_dir, name)


def chart_title(fig: Figure) -> str:
    """A chart's message: the figure's suptitle, else its axes' titles joined."""
    return fig.get_suptitle() or "; ".join(ax.get_title() for ax in fig.axes if ax.get_title())


def saved_title(path: Path) -> str | None:
    """The message save() wrote into a chart's PNG (its Title text chunk); None when the file has none."""
    try:
        with Image.open(path) as image:
            return image.text.get("Title")
    except OSError:
        return None


def save(fig: Figure, out_dir: Path, name: str) -> Path | None:
    """Save as PNG at a readable DPI, its title kept in the file (saved_title reads it for a report's caption), and
    close the figure; None (said on stderr) when the file cannot be written."""
    path = Path(out_dir) / f"{name}.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        # everything the tight box takes by default, plus the legends kept out of the layout: nothing is clipped
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Title": chart_title(fig)},
                    bbox_extra_artists=fig.get_default_bbox_extra_artists() + legends)
    except OSError as error:  # a full disk must not cost the section its measured numbers
        print(f"[chart] could not save {path} ({error.strerror or error}); the numbers are in the report",
              file=sys.stderr)
        return None
    finally:
        plt.close(fig)
    return path
