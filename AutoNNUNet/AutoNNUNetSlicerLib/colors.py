"""Segment colors for predictions: clearly different, and the same for the same class table."""

from __future__ import annotations

import colorsys
from typing import Mapping

#: Well separated colors for the first classes (RGB 0-1); more classes get golden-ratio hues.
PALETTE = (
    (0.90, 0.30, 0.24),  # red
    (0.18, 0.55, 0.85),  # blue
    (0.30, 0.75, 0.35),  # green
    (0.95, 0.75, 0.15),  # yellow
    (0.60, 0.35, 0.80),  # purple
    (0.10, 0.75, 0.75),  # cyan
    (0.95, 0.50, 0.10),  # orange
    (0.90, 0.45, 0.70),  # pink
    (0.55, 0.40, 0.25),  # brown
    (0.60, 0.80, 0.20),  # lime
)

Color = tuple[float, float, float]


def distinct_colors(count: int) -> list[Color]:
    """``count`` clearly different RGB colors (0-1), the same for the same count every time."""
    colors: list[Color] = list(PALETTE[:count])
    golden = 0.618033988749895
    hue = 0.11
    while len(colors) < count:
        hue = (hue + golden) % 1.0
        level = len(colors) // len(PALETTE)
        colors.append(colorsys.hsv_to_rgb(hue, 0.75 - 0.1 * (level % 3), 0.95 - 0.1 * (level % 2)))
    return [(float(r), float(g), float(b)) for r, g, b in colors]


def class_colors(classes: Mapping[str, int]) -> dict[str, Color]:
    """A color for every foreground class, in class-value order (background has none)."""
    foreground = sorted((value, name) for name, value in classes.items() if value != 0)
    colors = distinct_colors(len(foreground))
    return {name: colors[index] for index, (_, name) in enumerate(foreground)}
