"""The acceptance chart: a PNG for any rates in [0, 1], zero-height bars included."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.job.charts import HEIGHT, WIDTH, acceptance_chart, line_chart


@pytest.mark.parametrize("rates", [[0.9, 0.5, 0.0, 0.0], [1.0], [0.0], []])
def test_chart_is_a_png_with_a_bar_per_position(rates):
    chart = Image.open(io.BytesIO(acceptance_chart(rates, "acceptance")))
    assert chart.format == "PNG" and chart.size == (WIDTH, HEIGHT)
    bar = (60, 110, 200)
    painted = sum(count for count, colour in chart.convert("RGB").getcolors(WIDTH * HEIGHT) if colour == bar)
    assert (painted > 0) == any(rate > 0 for rate in rates)


def test_line_charts_numeric_and_categorical():
    series = {f"actor {i}": [(rows, 900.0 + i + rows / 1e4) for rows in (0, 12_345, 50_000, 100_000)] for i in range(3)}
    numeric = Image.open(io.BytesIO(line_chart(series, "memory", "rows written", "MB")))
    categorical = Image.open(io.BytesIO(line_chart({"a": [(1, 0.5), (8, 1.2), (5, 9.0)]}, "speedup", "batch", "x",
                                                   x_ticks=[1, 8, 32], reference=1.0)))
    for chart in (numeric, categorical):
        assert chart.format == "PNG" and chart.size == (WIDTH, HEIGHT)
    colours = {colour for _, colour in categorical.convert("RGB").getcolors(WIDTH * HEIGHT)}
    assert (60, 110, 200) in colours  # the series is drawn (the point off the ticks is skipped, not an error)
