"""PNG charts drawn with Pillow (no plotting dependency): per-position acceptance of a run."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 56


def acceptance_chart(acceptance_per_position: list[float], title: str) -> bytes:
    """Bars of how often each draft position was accepted (0..1), as PNG bytes."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.text((left, 16), title, fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left + 1, y), (right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    count = max(len(acceptance_per_position), 1)
    slot = (right - left) / count
    for i, rate in enumerate(acceptance_per_position):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        if rate > 0:
            draw.rectangle([x0, bottom - rate * (bottom - top), x1, bottom], fill=(60, 110, 200))
        draw.text((x0, bottom - rate * (bottom - top) - 14), f"{rate:.2f}", fill="black")
        draw.text(((x0 + x1) / 2 - 3, bottom + 6), str(i + 1), fill="black")
    draw.text(((left + right) / 2 - 60, bottom + 24), "draft position", fill="black")
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()
