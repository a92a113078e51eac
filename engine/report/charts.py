"""Charts as inline SVG made with matplotlib: error rates with 95 % intervals.

The SVG is deterministic (fixed hash salt, no date) and keeps text as text, so the
page stays small and searchable. Data strings are drawn as plain text (math
parsing off) and escaped by matplotlib's SVG writer.
"""

from __future__ import annotations

import io
import re

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
ACCENT = "#1d4ed8"  # significant slices, per-class rates
QUIET = "#9ca3af"  # slices that are not significant
OVERALL = "#b45309"
LABEL_CHARS = 48  # longer labels are cut with an ellipsis (the tables carry them in full)

_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "clipengine-report",
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
    "axes.edgecolor": GRID,
    "axes.labelcolor": INK,
    "xtick.color": MUTED,
    "ytick.color": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def interval_chart(
    labels: list[str],
    rates: list[float | None],
    lows: list[float | None],
    highs: list[float | None],
    *,
    overall: float | None,
    highlight: list[bool] | None = None,
    counts: list[int] | None = None,
    xlabel: str = "error rate (95 % interval)",
    salt: str = "",
    width: float = 7.2,
) -> str:
    """A horizontal interval plot as an ``<svg>`` string: one row per label, best first."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    style = dict(_STYLE, **{"svg.hashsalt": f"clipengine-report-{salt}"})
    with plt.rc_context(style):
        rows = len(labels)
        figure, axes = plt.subplots(figsize=(width, max(1.6, 0.75 + 0.26 * max(rows, 1))))
        try:
            positions = list(range(rows))[::-1]
            for i, y in enumerate(positions):
                colour = ACCENT if (highlight is None or highlight[i]) else QUIET
                if lows[i] is not None and highs[i] is not None:
                    axes.plot([lows[i], highs[i]], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
                if rates[i] is not None:
                    axes.plot([rates[i]], [y], marker="o", markersize=4.5, color=colour, linestyle="none")
            if overall is not None:
                axes.axvline(overall, color=OVERALL, linewidth=1, linestyle=(0, (4, 3)))
                axes.annotate("overall", (overall, 1.0), xycoords=("data", "axes fraction"), xytext=(3, 2),
                              textcoords="offset points", color=OVERALL, fontsize=8, va="bottom")
            axes.set_yticks(positions, [_cut(label) for label in labels])
            axes.set_ylim(-0.6, rows - 0.4)
            finite = [v for v in (*lows, *highs, *rates, overall) if v is not None]
            upper = max(finite) if finite else 1.0
            axes.set_xlim(0, min(1.0, upper * 1.08 + 0.01) if upper <= 1 else upper * 1.08)
            axes.set_xlabel(xlabel, color=MUTED)
            axes.grid(axis="x", color=GRID, linewidth=0.6)
            axes.set_axisbelow(True)
            axes.tick_params(axis="y", length=0)
            if counts is not None:
                right = axes.secondary_yaxis("right")
                right.set_yticks(positions, [f"n={c:,}" for c in counts])
                right.tick_params(axis="y", length=0, colors=MUTED)
                right.spines["right"].set_visible(False)
            figure.tight_layout(pad=0.4)
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        finally:
            plt.close(figure)
    return _inline(buffer.getvalue())


def _cut(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def _inline(svg: str) -> str:
    """Drop the XML prologue and make the figure scale with the page."""
    start = svg.index("<svg")
    svg = svg[start:]
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart" role="img"', svg, count=1)
    return svg.strip()


WORSE = "#b91c1c"  # slices that got worse since the baseline
BETTER = "#15803d"  # ... better


def change_chart(
    labels: list[str],
    old: list[tuple[float | None, float | None, float | None]],
    new: list[tuple[float | None, float | None, float | None]],
    worse: list[bool],
    *,
    xlabel: str = "error rate (95 % interval)",
    salt: str = "",
    width: float = 7.2,
) -> str:
    """Each slice's error rate in the baseline (grey) and in this run (red: worse, green: better),
    each ``(rate, low, high)`` with its interval, one row per slice, as an ``<svg>`` string."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    style = dict(_STYLE, **{"svg.hashsalt": f"clipengine-report-{salt}"})
    with plt.rc_context(style):
        rows = len(labels)
        figure, axes = plt.subplots(figsize=(width, max(1.8, 0.9 + 0.42 * max(rows, 1))))
        try:
            positions = list(range(rows))[::-1]
            for i, y in enumerate(positions):
                for (rate, low, high), offset, colour in ((old[i], 0.17, QUIET),
                                                          (new[i], -0.17, WORSE if worse[i] else BETTER)):
                    if low is not None and high is not None:
                        axes.plot([low, high], [y + offset] * 2, color=colour, linewidth=2.2, solid_capstyle="butt")
                    if rate is not None:
                        axes.plot([rate], [y + offset], marker="o", markersize=4.5, color=colour, linestyle="none")
            axes.plot([], [], color=QUIET, linewidth=2.2, label="baseline")
            axes.plot([], [], color=WORSE, linewidth=2.2, label="this run, worse")
            axes.plot([], [], color=BETTER, linewidth=2.2, label="this run, better")
            axes.legend(loc="lower right", fontsize=8, frameon=False)
            axes.set_yticks(positions, [_cut(label) for label in labels])
            axes.set_ylim(-0.7, rows - 0.3)
            finite = [v for triple in (*old, *new) for v in triple if v is not None]
            upper = max(finite) if finite else 1.0
            axes.set_xlim(0, min(1.0, upper * 1.08 + 0.01) if upper <= 1 else upper * 1.08)
            axes.set_xlabel(xlabel, color=MUTED)
            axes.grid(axis="x", color=GRID, linewidth=0.6)
            axes.set_axisbelow(True)
            axes.tick_params(axis="y", length=0)
            figure.tight_layout(pad=0.4)
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        finally:
            plt.close(figure)
    return _inline(buffer.getvalue())
