"""Benchmark rows and the table they print: service figures next to their baseline, with a ratio."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Row:
    model: str
    measure: str
    service: str
    baseline: str
    ratio: float | None  # None: a figure with nothing to compare it with

    @classmethod
    def of_pairs(
        cls,
        model: str,
        measure: str,
        pairs: list[tuple[float, float]],
        fmt: str,
        baseline_label: str,
        invert: bool = False,
    ) -> Row:
        """Medians of (service, baseline) pairs measured side by side, and the median per-pair ratio.

        The ratio is service / baseline, or baseline / service with `invert` (a slowdown of throughputs).
        Taking the median of per-pair ratios keeps a noisy moment on a shared machine from skewing it.
        """
        service = statistics.median(p[0] for p in pairs)
        baseline = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[1] / p[0] if invert else p[0] / p[1] for p in pairs)
        return cls(model, measure, format(service, fmt), f"{format(baseline, fmt)} ({baseline_label})", ratio)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(rows: list[Row], note: str) -> None:
    headers = ("model", "measure", "service", "baseline", "ratio")
    table = [headers] + [
        (r.model, r.measure, r.service, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}x") for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"\n{note}\n", flush=True)
