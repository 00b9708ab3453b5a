"""Inline SVG charts: no JavaScript chart library, no inline style (the CSP forbids it), colours
come from classes in dashboard.css."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.dashboard.markup import Safe, html, join

WIDTH, HEIGHT = 360, 90
PAD_LEFT, PAD_BOTTOM, PAD_TOP, PAD_RIGHT = 44, 16, 8, 6


@dataclass(frozen=True)
class Point:
    x: float  # epoch seconds
    y: float
    cls: str = ""
    title: str = ""
    href: str | None = None


def line_chart(points: Sequence[Point], x_range: tuple[float, float], y_label: str,
               unit: str, label: str, line: bool = True) -> Safe:
    """Points over time; the y axis starts at 0 and ends at the largest value."""
    x0, x1 = x_range
    if x1 <= x0:
        x1 = x0 + 1
    top = max((p.y for p in points), default=0.0) or 1.0
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(x: float) -> float:
        return PAD_LEFT + (min(max(x, x0), x1) - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + plot_h - y / top * plot_h

    parts: list[Safe] = [
        html('<line class="axis" x1="{a}" y1="{b}" x2="{c}" y2="{b}"/>',
             a=PAD_LEFT, b=f"{PAD_TOP + plot_h:.1f}", c=WIDTH - PAD_RIGHT),
        html('<line class="axis" x1="{a}" y1="{b}" x2="{a}" y2="{c}"/>',
             a=PAD_LEFT, b=PAD_TOP, c=f"{PAD_TOP + plot_h:.1f}"),
        html('<text class="tick" x="{x}" y="{y}" text-anchor="end">{t}</text>',
             x=PAD_LEFT - 4, y=PAD_TOP + 8, t=_fmt(top, unit)),
        html('<text class="tick" x="{x}" y="{y}" text-anchor="end">0</text>',
             x=PAD_LEFT - 4, y=f"{PAD_TOP + plot_h:.1f}"),
        html('<text class="tick" x="{x}" y="{y}">{t}</text>',
             x=PAD_LEFT, y=HEIGHT - 3, t=y_label),
    ]
    if line and len(points) > 1:
        coords = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in points)
        parts.append(html('<polyline class="series" points="{c}"/>', c=coords))
    if not points:
        parts.append(html('<text class="tick" x="{x}" y="{y}">no data yet</text>',
                          x=PAD_LEFT + 10, y=PAD_TOP + plot_h / 2))
    for p in points:
        dot = html('<circle class="dot {cls}" cx="{x}" cy="{y}" r="{r}"><title>{t}</title>'
                   '</circle>', cls=p.cls, x=f"{sx(p.x):.1f}", y=f"{sy(p.y):.1f}",
                   r=2.5 if line else 3.5, t=p.title)
        parts.append(html('<a href="{h}">{d}</a>', h=p.href, d=dot) if p.href else dot)
    return html('<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
                'aria-label="{label}">{body}</svg>', w=WIDTH, h=HEIGHT, label=label,
                body=join(parts))


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value / 1000:.1f}s" if value >= 1000 else f"{value:.0f}ms"
    if unit == "s":
        return f"{value / 60:.1f}m" if value >= 120 else f"{value:.0f}s"
    return f"{value:g}"
