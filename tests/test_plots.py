"""The house chart style: log ticks that read as plain numbers, legends outside the data, nothing clipped."""
from __future__ import annotations

from common import plots
from conftest import is_png


def test_log_axis_ticks_read_10_20_50_not_powers_of_ten():
    fig, ax = plots.figure("t", "x", "y")
    ax.bar([0, 1], [12, 3000])
    plots.log_y(ax)
    fig.canvas.draw()
    labels = [tick.get_text() for tick in ax.get_yticklabels() if tick.get_text()]
    assert {"20", "50", "100", "1000"} <= set(labels)
    assert not any("times" in label or "^" in label for label in labels)
    plots.plt.close(fig)


def test_legend_sits_outside_the_axes(tmp_path):
    fig, ax = plots.figure("t", "x", "y")
    ax.plot([1, 2], [1, 2], label="a long series name that would cover the data")
    plots.legend_outside(ax)
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # entirely to the right of the plotting area
    assert is_png(plots.save(fig, tmp_path, "legend"))
