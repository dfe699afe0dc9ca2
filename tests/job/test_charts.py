"""The acceptance chart: a PNG for any rates in [0, 1], zero-height bars included."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.job.charts import HEIGHT, WIDTH, acceptance_chart


@pytest.mark.parametrize("rates", [[0.9, 0.5, 0.0, 0.0], [1.0], [0.0], []])
def test_chart_is_a_png_with_a_bar_per_position(rates):
    chart = Image.open(io.BytesIO(acceptance_chart(rates, "acceptance")))
    assert chart.format == "PNG" and chart.size == (WIDTH, HEIGHT)
    bar = (60, 110, 200)
    painted = sum(count for count, colour in chart.convert("RGB").getcolors(WIDTH * HEIGHT) if colour == bar)
    assert (painted > 0) == any(rate > 0 for rate in rates)
