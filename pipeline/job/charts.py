"""PNG charts drawn with matplotlib's Agg canvas: grouped bars (per-position acceptance) and lines.

Each function returns PNG bytes of WIDTH x HEIGHT pixels; `acceptance_chart` is the caption job's
per-run chart. The benchmark and the soak (pipeline/lab, jobs/) draw their plots with the same
functions; they live in the job, which never imports the lab. matplotlib's tick locators put axis
ticks at round values and its legend goes where it covers the fewest points; figures are drawn
on their own canvas (no pyplot state), so charts can be drawn from any thread.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WIDTH, HEIGHT, DPI = 720, 400, 100
COLOURS = ["#3c6ec8", "#dc7828", "#3ca050", "#c83c3c", "#8c5ab4", "#787878", "#1eaabe", "#be961e"]


def _axes(title: str, x_label: str, y_label: str):
    figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(axis="y", color="#e1e1e1")
    axes.set_axisbelow(True)
    return figure, axes


def _png(figure, axes, legend: bool) -> bytes:
    if legend:
        axes.legend(loc="best", fontsize="small", frameon=False)
    figure.tight_layout()
    encoded = io.BytesIO()
    figure.savefig(encoded, format="png", dpi=DPI)
    return encoded.getvalue()


def bar_chart(groups: dict[str, list[float]], title: str, x_label: str, y_label: str = "",
              y_max: float = 1.0) -> bytes:
    """Grouped bars: bar i of each named series sits in slot i (labelled 1, 2, ...); one series gets its values
    written on top."""
    figure, axes = _axes(title, x_label, y_label)
    slots = max((len(values) for values in groups.values()), default=0)
    width = 0.8 / max(len(groups), 1)
    for g, (name, values) in enumerate(groups.items()):
        x = [i + 1 - 0.4 + (g + 0.5) * width for i in range(len(values))]
        bars = axes.bar(x, values, width=width, color=COLOURS[g % len(COLOURS)], label=name)
        if len(groups) == 1:
            axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(range(1, slots + 1))
    axes.set_xlim(0.4, slots + 0.6)
    axes.set_ylim(0, y_max * 1.08)
    return _png(figure, axes, legend=len(groups) > 1)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               x_ticks: list | None = None, reference: float | None = None) -> bytes:
    """Lines with markers. With x_ticks, x is categorical (evenly spaced ticks; points whose x is not a tick are
    skipped); without, x is numeric. An optional dashed horizontal reference line (e.g. speedup 1.0)."""
    figure, axes = _axes(title, x_label, y_label)
    slot = {tick: i for i, tick in enumerate(x_ticks)} if x_ticks is not None else None
    for s, (name, points) in enumerate(series.items()):
        kept = [(slot[x] if slot is not None else x, y) for x, y in points if slot is None or x in slot]
        if kept:
            xs, ys = zip(*kept)
            axes.plot(xs, ys, marker="o", markersize=4, color=COLOURS[s % len(COLOURS)], label=name)
    if x_ticks is not None:
        axes.set_xticks(range(len(x_ticks)), [str(tick) for tick in x_ticks])
    if reference is not None:
        axes.axhline(reference, color="black", linestyle="--", linewidth=1)
    axes.set_ylim(bottom=0)
    return _png(figure, axes, legend=len(series) > 1)


def acceptance_chart(acceptance_per_position: list[float], title: str) -> bytes:
    """Bars of how often each draft position was accepted (0..1)."""
    return bar_chart({"acceptance": acceptance_per_position}, title, "draft position", "accepted")
