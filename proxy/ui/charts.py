"""Charts as inline SVG, drawn on the server: no script runs in the dashboard, so its content
security policy can forbid every script. Each point carries its value in `data-` attributes,
which is what the browser test reads back.

A chart is drawn in a viewBox as wide as the page's content at its widest (so at 1:1 there) and
scales to its container's width; every label is anchored so that it stays inside the viewBox
(the last time label ends at the axis' end instead of centring on it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from keybrake.proxy.money import format_usd
from keybrake.proxy.ui.runs import Point

__all__ = ["Bar", "Chart", "Dot", "bars", "hits_chart", "spend_chart", "usd"]

WIDTH, HEIGHT = 1150, 240  # the viewBox; main's content is 1152 px at most, less 2 of border
LEFT, RIGHT, TOP, BOTTOM = 80, 16, 14, 30


def usd(micros: int | None) -> str:
    return "—" if micros is None else f"${format_usd(micros)}"


@dataclass(frozen=True, slots=True)
class Dot:
    x: float
    y: float
    at: str  # ISO 8601, UTC
    value: str  # USD for spend, a count for cap hits
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    path: str  # the line (spend) or "" (bars)
    dots: list[Dot]
    bars: list[tuple[float, float, float, float]]  # x, y, width, height
    cap_y: float | None  # where the cap's line goes
    cap_label: str
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str, str]]  # x, label, text-anchor ("middle", or "end" for the last)
    plot: tuple[int, int, int, int]  # left, top, right, bottom of the plot area


def _nice_top(value: int) -> tuple[int, int]:
    """A round top for the money axis, at or above `value` micros, and its tick step: 1, 2,
    2.5 or 5 times a power of ten, four steps to the top."""
    step = 10_000  # one cent
    while step * 4 < value:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10 (x2, x2.5, x2)
            step = int(step * factor)
            if step * 4 >= value:
                break
    return step * 4, step


def _x(at: datetime, start: datetime, span: float) -> float:
    return LEFT + (WIDTH - LEFT - RIGHT) * (at - start).total_seconds() / span


def _y(value: int, top: int, height: int = HEIGHT) -> float:
    inner = height - TOP - BOTTOM
    return TOP + inner - inner * value / top if top else float(height - BOTTOM)


def _x_ticks(start: datetime, span: float) -> list[tuple[float, str, str]]:
    """Five times along the axis; the last ends where the axis ends, the others centre on their
    time (the first has the money axis' margin to its left)."""
    form = "%m-%d %H:%M" if span >= 86400 else ("%H:%M" if span >= 600 else "%H:%M:%S")
    ticks: list[tuple[float, str, str]] = []
    for i in range(5):
        at = start + timedelta(seconds=span * i / 4)
        label = at.strftime(form)
        if not ticks or ticks[-1][1] != label:
            ticks.append((_x(at, start, span), label, "end" if i == 4 else "middle"))
    return ticks


def _axis(points: list[Point], start: datetime, end: datetime) -> tuple[datetime, float]:
    """The time axis: from the run's start to its end (now, for a live run), and at least as
    wide as its calls, never zero seconds long."""
    start = min(start, points[0].at) if points else start
    end = max(end, points[-1].at) if points else end
    return start, max((end - start).total_seconds(), 1.0)


def spend_chart(
    points: list[Point],
    cap_micros: int | None,
    cap_basis: str | None,
    start: datetime,
    end: datetime,
) -> Chart:
    """Cumulative spend as a step line from the run's start, with the run's cap drawn across
    when it has one."""
    if not points:
        return Chart(WIDTH, HEIGHT, "", [], [], None, "", [], [], _plot())
    start, span = _axis(points, start, end)
    top, step = _nice_top(max(points[-1].micros, cap_micros or 0, 1) * 21 // 20)
    dots = []
    path = [f"M{LEFT:.1f},{_y(0, top):.1f}"]
    previous_y = _y(0, top)
    for point in points:
        x, y = _x(point.at, start, span), _y(point.micros, top)
        path.append(f"L{x:.1f},{previous_y:.1f}L{x:.1f},{y:.1f}")
        previous_y = y
        dots.append(
            Dot(
                x,
                y,
                point.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                format_usd(point.micros),
                f"{point.at:%H:%M:%S} {usd(point.micros)}",
            )
        )
    path.append(f"L{WIDTH - RIGHT:.1f},{previous_y:.1f}")  # flat until the axis ends
    cap_y = _y(cap_micros, top) if cap_micros else None
    label = f"cap {usd(cap_micros)} ({cap_basis})" if cap_micros else ""
    y_ticks = [(_y(step * i, top), usd(step * i)) for i in range(5)]
    x_ticks = _x_ticks(start, span)
    return Chart(WIDTH, HEIGHT, "".join(path), dots, [], cap_y, label, y_ticks, x_ticks, _plot())


def hits_chart(points: list[Point], start: datetime, end: datetime) -> Chart:
    """Cap hits per point of the spend chart's time axis, as bars."""
    hits = [p for p in points if p.micros]
    if not hits:
        return Chart(WIDTH, HEIGHT // 2, "", [], [], None, "", [], [], _plot())
    start, span = _axis(points, start, end)
    top = max(p.micros for p in hits)
    height = HEIGHT // 2 - TOP - BOTTOM
    base = TOP + height
    rects, dots = [], []
    for p in hits:
        x = _x(p.at, start, span)
        h = max(1.0, height * p.micros / top)
        rects.append((x - 2, base - h, 4.0, h))
        dots.append(
            Dot(x, base - h, p.at.strftime("%Y-%m-%dT%H:%M:%SZ"), str(p.micros), f"{p.micros}")
        )
    y_ticks = [(float(base), "0"), (float(TOP), str(top))]
    return Chart(
        WIDTH,
        HEIGHT // 2,
        "",
        dots,
        rects,
        None,
        "",
        y_ticks,
        _x_ticks(start, span),
        (LEFT, TOP, WIDTH - RIGHT, base),
    )


def _plot() -> tuple[int, int, int, int]:
    return LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM


@dataclass(frozen=True, slots=True)
class Bar:
    tag: str | None  # the caller tag; None: untagged calls
    name: str
    width: float  # of 100
    value: str
    calls: int
    cap_hits: int


def bars(rows: list[tuple[str | None, int, int, int]]) -> list[Bar]:
    """Spend per caller tag (pod) as bars relative to the biggest spender."""
    top = max([r[1] for r in rows] + [1])
    return [
        Bar(tag, tag or "(untagged)", 100.0 * spent / top, usd(spent), calls, hits)
        for tag, spent, calls, hits in rows
    ]
