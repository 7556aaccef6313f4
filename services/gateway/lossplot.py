"""The loss curve as an inline SVG: train and validation loss over optimizer steps.

Drawn here rather than with a plotting library so that it renders the same in every browser, needs no
script, and can be read back from the page (each series is one `<polyline>` with a point per event).
"""

from __future__ import annotations

import html

WIDTH, HEIGHT, MARGIN = 640, 240, 44
COLORS = {"train": "#ea580c", "validation": "#2563eb"}
MAX_POINTS = 600  # per series; more add nothing at this width


def loss_svg(points: list[tuple[int, float, str]], total_steps: int = 0) -> str:
    """`points` are (step, loss, series) with series "train" or "validation"; the step axis runs to
    `total_steps` when known, so the curve grows across the plot as the job runs."""
    finite = [(s, loss, name) for s, loss, name in points if loss == loss and abs(loss) != float("inf")]
    if not finite:
        return _frame('<text x="50%" y="50%" text-anchor="middle" fill="#71717a">no loss reported yet</text>')
    steps = [s for s, _, _ in finite]
    losses = [loss for _, loss, _ in finite]
    x0 = min(steps)
    x1 = max(max(steps), total_steps, x0 + 1)
    y0, y1 = min(0.0, min(losses)), max(losses) or 1.0

    def x(step: float) -> float:
        return MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def y(loss: float) -> float:
        return HEIGHT - MARGIN + (loss - y0) / (y1 - y0) * (2 * MARGIN - HEIGHT)

    parts = [
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#a1a1aa"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#a1a1aa"/>',
        _label(MARGIN - 6, HEIGHT - MARGIN, f"{y0:.3g}", "end"),
        _label(MARGIN - 6, MARGIN + 4, f"{y1:.3g}", "end"),
        _label(MARGIN, HEIGHT - MARGIN + 16, f"step {x0}", "start"),
        _label(WIDTH - MARGIN, HEIGHT - MARGIN + 16, f"step {x1}", "end"),
    ]
    for i, (series, color) in enumerate(COLORS.items()):
        coords = thin([(x(s), y(loss)) for s, loss, name in finite if name == series])
        if not coords:
            continue
        text = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
        parts.append(
            f'<polyline class="loss-{series}" data-points="{len(coords)}" points="{text}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        last = next(loss for _, loss, name in reversed(finite) if name == series)
        parts.append(_label(WIDTH - MARGIN, 16 + 16 * i, f"{series} {last:.4g}", "end", color))
    return _frame("".join(parts))


def _label(x: float, y: float, text: str, anchor: str, color: str = "#52525b") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12" fill="{color}">{html.escape(text)}</text>'
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
