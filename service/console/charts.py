"""Charts as SVG geometry for the templates: bars with their numbers written beside them, and
lines told apart by dash pattern, marker shape and an end label, never by colour alone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DASHES = ("", "6 3", "2 3", "10 3 2 3", "1 5", "12 6", "4 2 1 2")
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "circle-open", "square-open")
SHADES = ("#1f4e79", "#7a4b00", "#3d6b35", "#6b2f5f", "#444444", "#8a2c2c", "#2f6b6b")
PATTERNS = ("solid", "hatch", "dots", "cross", "solid", "hatch", "dots")


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    y: float
    width: float
    pattern: str
    shade: str


@dataclass(frozen=True)
class BarChart:
    bars: list[Bar]
    height: float
    label_width: float
    plot_width: float
    row: float


def bar_chart(values: dict[str, int], *, plot_width: float = 360, row: float = 22) -> BarChart:
    """One horizontal bar per name, scaled to the largest value."""
    top = max(values.values(), default=0) or 1
    bars = [
        Bar(
            label=name,
            value=value,
            y=i * row,
            width=plot_width * value / top,
            pattern=PATTERNS[i % len(PATTERNS)],
            shade=SHADES[i % len(SHADES)],
        )
        for i, (name, value) in enumerate(values.items())
    ]
    return BarChart(
        bars, height=max(len(bars), 1) * row + 4, label_width=120, plot_width=plot_width, row=row
    )


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    value: int
    when: str


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point]
    dash: str
    marker: str
    shade: str

    @property
    def path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class LineChart:
    series: list[Series]
    width: float
    height: float
    left: float
    top: float
    plot_width: float
    plot_height: float
    y_ticks: list[tuple[float, int]]
    x_ticks: list[tuple[float, str]]


def line_chart(
    history: dict[str, list[tuple[datetime, int]]],
    *,
    plot_width: float = 520,
    plot_height: float = 200,
) -> LineChart:
    """One line per name over time, on a shared axis from zero."""
    times = sorted({when for points in history.values() for when, _ in points})
    top = max((n for points in history.values() for _, n in points), default=0) or 1
    left, upper = 56.0, 12.0
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0

    def x(when: datetime) -> float:
        if span == 0:
            return left + plot_width / 2
        return left + plot_width * (when - times[0]).total_seconds() / span

    def y(n: int) -> float:
        return upper + plot_height * (1 - n / top)

    series = [
        Series(
            name=name,
            points=[Point(x(w), y(n), n, w.strftime("%Y-%m-%d %H:%M")) for w, n in points],
            dash=DASHES[i % len(DASHES)],
            marker=MARKERS[i % len(MARKERS)],
            shade=SHADES[i % len(SHADES)],
        )
        for i, (name, points) in enumerate(history.items())
    ]
    y_ticks = [(y(round(top * f)), round(top * f)) for f in (0, 0.25, 0.5, 0.75, 1)]
    shown = times if len(times) <= 6 else [times[i * (len(times) - 1) // 5] for i in range(6)]
    x_ticks = [(x(t), t.strftime("%m-%d")) for t in shown]
    return LineChart(
        series=series,
        width=left + plot_width + 120,
        height=upper + plot_height + 30,
        left=left,
        top=upper,
        plot_width=plot_width,
        plot_height=plot_height,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
    )
