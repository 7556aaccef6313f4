"""The loss curve as an inline SVG: train and validation loss over optimizer steps.

Drawn here rather than with a plotting library so that it renders the same in every browser, needs no
script, and can be read back from the page (each series is one `<polyline>` with a point per event).
The y-axis spans the losses seen (not down to 0, where a curve that fell from 3.2 to 2.9 looks flat), with
round-numbered ticks; on a log scale its ticks are 1, 2 and 5 times powers of ten.
"""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 58, 24, 30, 40  # room for the y labels, the legend and the x labels
COLORS = {"train": "#ea580c", "validation": "#2563eb"}
MAX_POINTS = 600  # per series; more add nothing at this width
GRID = "#e4e4e7"
INK = "#52525b"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers (1, 2, 2.5 or 5 times a power of ten apart) from at or below `low` to at
    or above `high`."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [_round(i * step, step) for i in range(first, last + 1)]


def step_ticks(first: int, last: int, count: int = 6) -> list[int]:
    """Round-numbered whole steps within [first, last], and `first` itself where no tick is near it."""
    ticks = [int(t) for t in nice_ticks(first, last, count) if t == int(t) and first <= t <= last]
    if not ticks:
        return [first, last]
    gap = ticks[1] - ticks[0] if len(ticks) > 1 else last - first
    return [first, *ticks] if ticks[0] - first >= gap / 2 else ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks for a log axis over [low, high] (both > 0): powers of ten, with their 2× and 5× or every whole
    multiple where that takes at least four within the range, else round numbers around it (a narrow range)."""
    powers = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [_round(m * 10.0**p, 10.0**p) for p in powers for m in mantissas]
        inside = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
        if len(inside) >= 4:
            return inside
    return [t for t in nice_ticks(low, high) if t > 0] or [low, high]


def loss_svg(points: list[tuple[int, float, str]], total_steps: int = 0, log_scale: bool = False) -> str:
    """`points` are (step, loss, series) with series "train" or "validation"; the step axis runs to
    `total_steps` when known, so the curve grows across the plot as the job runs."""
    finite = [(s, loss, name) for s, loss, name in points if math.isfinite(loss)]
    if not finite:
        return _frame(_label(WIDTH / 2, HEIGHT / 2, "no loss reported yet", "middle", "#71717a"))
    steps = [s for s, _, _ in finite]
    note = ""
    if log_scale and min(loss for _, loss, _ in finite) <= 0:
        log_scale, note = False, "log scale needs losses above 0"
    x_axis = _Axis(min(steps), max(max(steps), total_steps, min(steps) + 1), LEFT, WIDTH - RIGHT)
    y_axis = _loss_axis([loss for _, loss, _ in finite], log_scale)
    parts = [*_y_grid(y_axis), *_x_ticks(x_axis), _axes()]
    for i, (series, color) in enumerate(COLORS.items()):
        coords = thin([(x_axis.at(s), y_axis.at(loss)) for s, loss, name in finite if name == series])
        if not coords:
            continue
        text = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
        parts.append(
            f'<polyline class="loss-{series}" data-points="{len(coords)}" points="{text}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        if len(coords) <= 30:  # few points (validation): mark each, so a single one shows
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"/>' for px, py in coords]
        last = next(loss for _, loss, name in reversed(finite) if name == series)
        parts.append(_label(WIDTH - RIGHT - 150 * (1 - i), 16, f"— {series} {last:.4g}", "end", color))
    parts.append(_label(LEFT, 16, ("loss (log scale)" if log_scale else "loss") + (f" · {note}" if note else ""),
                        "start"))  # fmt: skip
    return _frame("".join(parts))


class _Axis:
    """Maps values in [low, high] (their logs, on a log axis) to pixels from `start` to `end`."""

    def __init__(self, low: float, high: float, start: float, end: float, log: bool = False, ticks=()):
        self.log, self.ticks = log, list(ticks)
        self.low, self.high = (math.log10(low), math.log10(high)) if log else (low, high)
        self.start, self.end = start, end

    def at(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.low) / ((self.high - self.low) or 1.0) * (self.end - self.start)


def _loss_axis(losses: list[float], log: bool) -> _Axis:
    low, high = min(losses), max(losses)
    if log:
        if high / low < 1.05:  # a flat curve: show it in a band around its value
            low, high = low / 1.05, high * 1.05
        ticks, pad = log_ticks(low, high), (high / low) ** 0.04  # a little room above and below the curve
        return _Axis(min(low / pad, ticks[0]), max(high * pad, ticks[-1]), HEIGHT - BOTTOM, TOP, True, ticks)
    ticks = nice_ticks(low, high)
    return _Axis(ticks[0], ticks[-1], HEIGHT - BOTTOM, TOP, False, ticks)


def _y_grid(axis: _Axis) -> list[str]:
    step = min((b - a for a, b in zip(axis.ticks, axis.ticks[1:], strict=False)), default=1.0)
    parts = []
    for tick in axis.ticks:
        y = axis.at(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{GRID}"/>')
        text = f"{tick:g}" if axis.log else f"{tick:.{_decimals(step)}f}"
        parts.append(_label(LEFT - 6, y + 4, text, "end", css_class="y-tick"))
    return parts


def _x_ticks(axis: _Axis) -> list[str]:
    parts = []
    bottom = HEIGHT - BOTTOM
    for tick in step_ticks(int(axis.low), int(axis.high)):
        x = axis.at(tick)
        anchor = "end" if x > WIDTH - RIGHT - 24 else "middle"  # the last label stays inside the plot
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="{INK}"/>')
        parts.append(_label(x + (4 if anchor == "end" else 0), bottom + 16, f"{tick:,}", anchor, css_class="x-tick"))
    parts.append(_label((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 6, "step", "middle"))
    return parts


def _axes() -> str:
    bottom = HEIGHT - BOTTOM
    return (
        f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="#a1a1aa"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#a1a1aa"/>'
    )


def _round(value: float, step: float) -> float:
    """`value` without the float noise of multiplying by `step` (0.30000000000000004 → 0.3)."""
    return round(value, _decimals(step) + 1)


def _decimals(step: float) -> int:
    """The decimals that show every multiple of `step` exactly (2.5 → 1, 0.02 → 2, 50 → 0)."""
    return next((d for d in range(10) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step))), 10)


def _label(x: float, y: float, text: str, anchor: str, color: str = INK, css_class: str = "") -> str:
    attrs = f' class="{css_class}"' if css_class else ""
    return (
        f'<text{attrs} x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12" fill="{color}">'
        f"{html.escape(text)}</text>"
    )


def _frame(body: str) -> str:
    return (
        f'<svg class="loss-plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-label="training and validation loss by step" xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


def thin(coords: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `limit` points, evenly spaced and keeping the last: a long job's curve stays a small SVG."""
    if len(coords) <= limit:
        return coords
    stride = len(coords) / (limit - 1)
    return [coords[int(i * stride)] for i in range(limit - 1)] + [coords[-1]]
