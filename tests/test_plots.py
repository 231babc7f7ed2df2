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


def test_roofline_caps_the_memory_roof_at_the_peak_and_puts_the_legend_below(tmp_path):
    fig, ax = plots.figure("t", "x", "y")
    points = [{"group": "g", "label": f"batch {n}", "intensity": n * 10.0, "flops": n * 1e9, "joined": True}
              for n in (1, 4)]
    plots.roofline(ax, points, peak_flops=50e9, bandwidth=1e9, roof_label="roofs")
    roof = ax.get_lines()[0]
    assert list(roof.get_xdata()) == [5.0, 50.0, 150.0] and list(roof.get_ydata()) == [5.0, 50.0, 50.0]
    assert ax.get_lines()[1].get_linestyle() == "-" and ax.get_xscale() == "log"
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # under the plotting area
    assert is_png(plots.save(fig, tmp_path, "roofline"))


def test_a_long_outside_legend_widens_the_image_instead_of_squeezing_the_plot(tmp_path):
    from PIL import Image

    widths = {}
    for label in ("a", "a legend entry long enough to take more room than the plotting area has " * 2):
        fig, ax = plots.figure("t", "x", "y")
        ax.plot([1, 2], [1, 2], label=label)
        plots.legend_outside(ax)
        fig.tight_layout()
        fig.canvas.draw()
        axes_width = ax.get_window_extent().width
        path = plots.save(fig, tmp_path, f"legend{len(label)}")
        widths[label] = (axes_width, Image.open(path).size[0])
    (short_axes, short_image), (long_axes, long_image) = widths.values()
    assert long_axes == short_axes  # the plot keeps its size
    assert long_image > short_image + 300  # and the saved image holds the whole legend


def test_a_saved_chart_carries_its_title_for_a_reports_caption(tmp_path):
    fig, ax = plots.figure("Batch 16 is the knee", "x", "y")
    ax.plot([1, 2], [1, 2])
    assert plots.saved_title(plots.save(fig, tmp_path, "titled")) == "Batch 16 is the knee"
    assert plots.saved_title(tmp_path / "missing.png") is None


def test_grouped_bars_never_label_a_bar_minus_zero():
    from common import plots
    fig, ax = plots.plt.subplots()
    plots.grouped_bars(ax, ["a", "b"], [("x", [1.2, -0.07]), ("y", [None, -2.4])], value_format="%.0f")
    assert [text.get_text() for text in ax.texts] == ["1", "0", "-2"]
    plots.plt.close(fig)
