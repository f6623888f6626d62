"""The jobs-per-second chart as inline SVG, drawn on the server.

Why SVG from the server: the chart then reads with JavaScript off, needs no library, and the
page's small script only swaps in the newer server-drawn version every few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastworker.web_html import Html, join, render
from fastworker.web_sampler import Point

WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28
SERIES = (("success", "succeeded"), ("retry", "retried"), ("dead_letter", "dead-lettered"))


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above `value` (at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def chart(points: Sequence[Point], span: float, now: float) -> Html:
    """The last `span` seconds of `points` up to `now`, one line per outcome."""
    shown = [p for p in points if now - p.at <= span]
    peak = max((max(p.success, p.retry, p.dead_letter) for p in shown), default=0.0)
    top = nice_ceiling(peak)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: float) -> float:
        return LEFT + plot_w * (1 - (now - at) / span)

    def y(rate: float) -> float:
        return TOP + plot_h * (1 - rate / top)

    lines = []
    for attr, label in SERIES:
        coords = " ".join(f"{x(p.at):.1f},{y(getattr(p, attr)):.1f}" for p in shown)
        if coords:
            lines.append(
                render(
                    '<polyline class="series {attr}" points="{coords}"><title>{label}</title>'
                    "</polyline>",
                    attr=attr.replace("_", "-"),
                    coords=coords,
                    label=label,
                )
            )
    grid = []
    for fraction in (0.0, 0.5, 1.0):
        rate = top * fraction
        grid.append(
            render(
                '<line class="grid" x1="{x1}" x2="{x2}" y1="{y}" y2="{y}"></line>'
                '<text class="axis" x="{tx}" y="{ty}" text-anchor="end">{label}</text>',
                x1=LEFT,
                x2=WIDTH - RIGHT,
                y=f"{y(rate):.1f}",
                tx=LEFT - 6,
                ty=f"{y(rate) + 4:.1f}",
                label=f"{rate:g}",
            )
        )
    minutes = span / 60
    ticks = []
    for fraction, label in ((0.0, f"-{minutes:g} min"), (0.5, f"-{minutes / 2:g} min"), (1, "now")):
        ticks.append(
            render(
                '<text class="axis" x="{x}" y="{y}" text-anchor="{anchor}">{label}</text>',
                x=f"{LEFT + plot_w * fraction:.1f}",
                y=HEIGHT - 8,
                anchor={0.0: "start", 0.5: "middle"}.get(fraction, "end"),
                label=label,
            )
        )
    empty = Html("")
    if not shown:
        empty = render(
            '<text class="axis" x="{x}" y="{y}" text-anchor="middle">{text}</text>',
            x=LEFT + plot_w / 2,
            y=TOP + plot_h / 2,
            text="no samples yet",
        )
    return render(
        '<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{aria}">'
        "{grid}{ticks}{lines}{empty}</svg>",
        w=WIDTH,
        h=HEIGHT,
        aria=f"jobs per second over the last {minutes:g} minutes",
        grid=join(grid),
        ticks=join(ticks),
        lines=join(lines),
        empty=empty,
    )
