"""Matplotlib on the Agg backend with one house style; `save` writes a titled chart into the output folder."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

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


def figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] | None = None):
    """A new figure with one axis, already titled and labelled (put units in the labels)."""
    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def log2_x(ax, values) -> None:
    """A log2 x axis ticked at exactly these values (batch sizes, thread counts, lengths), no minor ticks."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(value) for value in ticks])
    ax.minorticks_off()


def save(fig, out_dir: Path, name: str) -> Path | None:
    """Save as PNG at a readable DPI and close the figure; None (said on stderr) when the file cannot be written."""
    path = Path(out_dir) / f"{name}.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    except OSError as error:  # a full disk must not cost the section its measured numbers
        print(f"[chart] could not save {path} ({error.strerror or error}); the numbers are in the report",
              file=sys.stderr)
        return None
    finally:
        plt.close(fig)
    return path
