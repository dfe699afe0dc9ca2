"""PNG charts drawn with Pillow (no plotting dependency): grouped bars (per-position acceptance) and lines.

Each function returns PNG bytes; `acceptance_chart` is the caption job's per-run chart. The benchmark
(pipeline/lab) draws its plots with the same functions; they live in the job, which never imports the lab.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 400, 60
COLOURS = [(60, 110, 200), (220, 120, 40), (60, 160, 80), (200, 60, 60), (140, 90, 180), (120, 120, 120),
           (30, 170, 190), (190, 150, 30)]


class _Axes:
    """A plotting area with a y axis from 0 to y_max, gridlines and a legend."""

    def __init__(self, title: str, x_label: str, y_label: str, y_max: float, legend: list[str]):
        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        draw = self.draw
        draw.text((MARGIN, 10), title, fill="black")
        x, y = MARGIN, 28
        for i, name in enumerate(legend if len(legend) > 1 else []):  # wrapped onto as many lines as it needs
            width = 24 + 7 * len(name)
            if x + width > WIDTH - 10:
                x, y = MARGIN, y + 16
            draw.rectangle([x, y + 1, x + 10, y + 11], fill=COLOURS[i % len(COLOURS)])
            draw.text((x + 14, y), name, fill="black")
            x += width
        self.left, self.top, self.right, self.bottom = MARGIN, y + 36, WIDTH - MARGIN // 2, HEIGHT - MARGIN
        self.y_max = y_max
        draw.line([(self.left, self.top), (self.left, self.bottom), (self.right, self.bottom)], fill="black")
        for i in range(5):
            value = y_max * i / 4
            tick_y = self.y(value)
            draw.line([(self.left - 4, tick_y), (self.left, tick_y)], fill="black")
            draw.line([(self.left + 1, tick_y), (self.right, tick_y)], fill=(225, 225, 225))
            draw.text((6, tick_y - 6), f"{value:.2f}", fill="black")
        draw.text((6, self.top - 20), y_label, fill="black")
        draw.text(((self.left + self.right) / 2 - 40, self.bottom + 28), x_label, fill="black")

    def y(self, value: float) -> float:
        return self.bottom - min(max(value, 0.0), self.y_max) / self.y_max * (self.bottom - self.top)

    def x_tick(self, x: float, label: str) -> None:
        self.draw.line([(x, self.bottom), (x, self.bottom + 4)], fill="black")
        self.draw.text((x - 3 * len(label), self.bottom + 8), label, fill="black")

    def png(self) -> bytes:
        encoded = io.BytesIO()
        self.image.save(encoded, "PNG")
        return encoded.getvalue()


def bar_chart(groups: dict[str, list[float]], title: str, x_label: str, y_label: str = "",
              y_max: float = 1.0) -> bytes:
    """Grouped bars: bar i of each named series sits in slot i (labelled 1, 2, ...), with its value on top."""
    axes = _Axes(title, x_label, y_label, y_max, list(groups))
    slots = max((len(values) for values in groups.values()), default=1) or 1
    slot = (axes.right - axes.left) / slots
    width = slot * 0.7 / max(len(groups), 1)
    for g, values in enumerate(groups.values()):
        for i, value in enumerate(values):
            x0 = axes.left + i * slot + slot * 0.15 + g * width
            if value > 0:  # a zero-height rectangle is an error in Pillow
                axes.draw.rectangle([x0, axes.y(value), x0 + width - 1, axes.bottom], fill=COLOURS[g % len(COLOURS)])
            if len(groups) == 1:
                axes.draw.text((x0, axes.y(value) - 14), f"{value:.2f}", fill="black")
    for i in range(slots):
        axes.x_tick(axes.left + (i + 0.5) * slot, str(i + 1))
    return axes.png()


def line_chart(series: dict[str, list[tuple[int, float]]], title: str, x_label: str, y_label: str,
               x_ticks: list, reference: float | None = None) -> bytes:
    """Lines over categorical x positions `x_ticks` (points whose x is not a tick are skipped); an optional dashed
    horizontal reference line (e.g. speedup 1.0)."""
    values = [y for points in series.values() for _, y in points] + ([reference] if reference is not None else [])
    axes = _Axes(title, x_label, y_label, max(values, default=1.0) * 1.15 or 1.0, list(series))
    step = (axes.right - axes.left) / max(len(x_ticks), 1)
    position = {tick: axes.left + (i + 0.5) * step for i, tick in enumerate(x_ticks)}
    for tick, x in position.items():
        axes.x_tick(x, str(tick))
    if reference is not None:
        y = axes.y(reference)
        for x in range(int(axes.left), int(axes.right), 12):
            axes.draw.line([(x, y), (x + 6, y)], fill="black")
    for s, points in enumerate(series.values()):
        colour = COLOURS[s % len(COLOURS)]
        xy = [(position[x], axes.y(y)) for x, y in points if x in position]
        if len(xy) > 1:
            axes.draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            axes.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return axes.png()


def acceptance_chart(acceptance_per_position: list[float], title: str) -> bytes:
    """Bars of how often each draft position was accepted (0..1)."""
    return bar_chart({"acceptance": acceptance_per_position}, title, "draft position", "accepted")
