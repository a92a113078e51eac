"""Charts as inline SVG made with matplotlib: error rates with 95 % intervals, changes since a baseline,
coverage heat maps.

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
    rows = len(labels)

    def draw(figure, axes) -> None:
        positions = list(range(rows))[::-1]
        for i, y in enumerate(positions):
            colour = ACCENT if (highlight is None or highlight[i]) else QUIET
            _interval_mark(axes, rates[i], lows[i], highs[i], y, colour)
        if overall is not None:
            axes.axvline(overall, color=OVERALL, linewidth=1, linestyle=(0, (4, 3)))
            axes.annotate("overall", (overall, 1.0), xycoords=("data", "axes fraction"), xytext=(3, 2),
                          textcoords="offset points", color=OVERALL, fontsize=8, va="bottom")
        axes.set_yticks(positions, [_cut(label) for label in labels])
        axes.set_ylim(-0.6, rows - 0.4)
        _rate_axis(axes, [v for v in (*lows, *highs, *rates, overall) if v is not None], xlabel)
        if counts is not None:
            right = axes.secondary_yaxis("right")
            right.set_yticks(positions, [f"n={c:,}" for c in counts])
            right.tick_params(axis="y", length=0, colors=MUTED)
            right.spines["right"].set_visible(False)

    return _render(salt, (width, max(1.6, 0.75 + 0.26 * max(rows, 1))), draw)


def _render(salt: str, size: tuple[float, float], draw, style: dict | None = None) -> str:
    """``draw(figure, axes)`` on one figure of ``size`` inches in the report's style (``style``: more rc
    settings), laid out → the figure as an inline ``<svg>`` string."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context(dict(_STYLE, **{"svg.hashsalt": f"clipengine-report-{salt}"}, **(style or {}))):
        figure, axes = plt.subplots(figsize=size)
        try:
            draw(figure, axes)
            figure.tight_layout(pad=0.4)
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        finally:
            plt.close(figure)
    return _inline(buffer.getvalue())


def _rate_axis(axes, values: list[float], xlabel: str) -> None:
    """The x axis of a rate chart: from 0 to just past the largest of ``values``, labelled, with a grid."""
    upper = max(values) if values else 1.0
    axes.set_xlim(0, min(1.0, upper * 1.08 + 0.01) if upper <= 1 else upper * 1.08)
    axes.set_xlabel(xlabel, color=MUTED)
    axes.grid(axis="x", color=GRID, linewidth=0.6)
    axes.set_axisbelow(True)
    axes.tick_params(axis="y", length=0)


def _interval_mark(axes, rate, low, high, y: float, colour: str) -> None:
    """One row of an interval chart: the interval as a bar, the rate as a dot (either may be None)."""
    if low is not None and high is not None:
        axes.plot([low, high], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
    if rate is not None:
        axes.plot([rate], [y], marker="o", markersize=4.5, color=colour, linestyle="none")


def _cut(label: str, chars: int = LABEL_CHARS) -> str:
    return label if len(label) <= chars else label[: chars - 1] + "…"


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
    rows = len(labels)

    def draw(figure, axes) -> None:
        positions = list(range(rows))[::-1]
        for i, y in enumerate(positions):
            _interval_mark(axes, *old[i], y + 0.17, QUIET)
            _interval_mark(axes, *new[i], y - 0.17, WORSE if worse[i] else BETTER)
        axes.plot([], [], color=QUIET, linewidth=2.2, label="baseline")
        axes.plot([], [], color=WORSE, linewidth=2.2, label="this run, worse")
        axes.plot([], [], color=BETTER, linewidth=2.2, label="this run, better")
        axes.legend(loc="lower right", fontsize=8, frameon=False)
        axes.set_yticks(positions, [_cut(label) for label in labels])
        axes.set_ylim(-0.7, rows - 0.3)
        _rate_axis(axes, [v for triple in (*old, *new) for v in triple if v is not None], xlabel)

    return _render(salt, (width, max(1.8, 0.9 + 0.42 * max(rows, 1))), draw)


# ---- coverage heat maps ---------------------------------------------------------------------------
COVERED, THIN, MISSING, EXCLUDED = 0, 1, 2, 3  # a cell's state in heat_map
MISSING_INK = "#b91c1c"
THIN_INK = "#d97706"
EXCLUDED_FILL = "#f3f4f6"
HEAT_MAP_LABEL_CHARS = 22


def heat_map(
    row_labels: list[str],
    column_labels: list[str],
    counts,
    states,
    *,
    row_title: str,
    column_title: str,
    salt: str = "",
) -> str:
    """Counts of the value combinations of two features as an ``<svg>`` string: one cell per
    combination (rows: ``row_labels``, columns: ``column_labels``), its count written in it, shaded by
    log(1 + count). ``counts`` (R, C) float; ``states`` (R, C) int: :data:`COVERED`, :data:`THIN`
    (orange border), :data:`MISSING` (white, red border, a bold red count) or :data:`EXCLUDED` (grey,
    hatched, "excl."). Each missing cell's group carries the id ``<salt>-missing-<row>-<column>``, each
    thin one ``<salt>-thin-…``, so a page can find them."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    counts = np.asarray(counts, dtype=np.float64)
    states = np.asarray(states)
    n_rows, n_columns = counts.shape
    shaded = np.log1p(np.where(states == EXCLUDED, 0.0, np.maximum(counts, 0.0)))
    top = float(shaded.max()) if shaded.size and shaded.max() > 0 else 1.0
    colours = matplotlib.colormaps["Blues"]
    longest = max((len(_cut(label, HEAT_MAP_LABEL_CHARS)) for label in column_labels), default=1)
    rotate = longest > 6 or n_columns > 8
    width = min(7.2, 1.4 + 0.1 * max(len(_cut(r, HEAT_MAP_LABEL_CHARS)) for r in row_labels) + 0.55 * n_columns)
    height = 0.9 + 0.3 * n_rows + (0.07 * longest if rotate else 0.2)

    def draw(figure, axes) -> None:
        for i in range(n_rows):
            for j in range(n_columns):
                state = int(states[i, j])
                level = shaded[i, j] / top
                if state == EXCLUDED:
                    cell = Rectangle((j, i), 1, 1, facecolor=EXCLUDED_FILL, edgecolor="white", hatch="///",
                                     linewidth=1.0)
                    text, ink, weight = "excl.", MUTED, "normal"
                elif state == MISSING:
                    cell = Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, facecolor="white", edgecolor=MISSING_INK,
                                     linewidth=1.6)
                    text, ink, weight = _compact(counts[i, j]), MISSING_INK, "bold"
                else:
                    edge, line = (THIN_INK, 1.6) if state == THIN else ("white", 1.0)
                    inset = 0.04 if state == THIN else 0.0
                    cell = Rectangle((j + inset, i + inset), 1 - 2 * inset, 1 - 2 * inset,
                                     facecolor=colours(0.08 + 0.8 * level), edgecolor=edge, linewidth=line)
                    text, ink = _compact(counts[i, j]), ("white" if level > 0.6 else INK)
                    weight = "bold" if state == THIN else "normal"
                if state in (MISSING, THIN):
                    cell.set_gid(f"{salt}-{'missing' if state == MISSING else 'thin'}-{i}-{j}")
                axes.add_patch(cell)
                axes.text(j + 0.5, i + 0.5, text, ha="center", va="center", color=ink, fontsize=7.5,
                          fontweight=weight)
        axes.set_xlim(0, n_columns)
        axes.set_ylim(n_rows, 0)
        axes.set_xticks([j + 0.5 for j in range(n_columns)],
                        [_cut(label, HEAT_MAP_LABEL_CHARS) for label in column_labels],
                        rotation=40 if rotate else 0, ha="right" if rotate else "center")
        axes.set_yticks([i + 0.5 for i in range(n_rows)], [_cut(label, HEAT_MAP_LABEL_CHARS) for label in row_labels])
        axes.set_xlabel(_cut(column_title), color=MUTED)
        axes.set_ylabel(_cut(row_title), color=MUTED)
        axes.tick_params(length=0)
        for spine in axes.spines.values():
            spine.set_visible(False)

    svg = _render(salt, (max(width, 2.6), height), draw, {"hatch.color": "#9ca3af", "hatch.linewidth": 0.6})
    # drawn at its own size (text as large as in the other charts), narrower where the page is
    width_px = round(max(width, 2.6) * 96)
    return svg.replace('class="chart"', f'class="chart" style="max-width: {width_px}px"', 1)


def _compact(value: float) -> str:
    """A count in at most four characters: 7, 950, 1.2k, 35k, 1.2M; expected counts keep one decimal."""
    if value != value:
        return "–"
    if abs(value - round(value)) > 1e-9 and abs(value) < 100:
        return f"{value:.1f}"
    value = round(value)
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return str(int(value))
