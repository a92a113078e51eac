"""``clipengine slices``: options → ``SliceConfig`` → :func:`clipengine.slices.find_slices` → print."""

from __future__ import annotations

import click

_SIZE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _parse_memory(value: str | None) -> int | None:
    """``"8G"``, ``"500M"``, ``"2.5G"`` or bytes → bytes."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        number = -1.0
    if not number > 0:
        raise click.BadParameter(f"{value!r} is not a size such as 8G or 500M", param_hint="--max-memory")
    return int(number * _SIZE_UNITS[unit])


def _parse_min_sup(value: str | None):
    if value is None:
        return None
    try:
        return float(value) if any(ch in value for ch in ".eE") else int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a row count nor a fraction", param_hint="--min-sup") from None


@click.command("slices")
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--error", "error", required=True, help="Column of per-row errors (0/1 or non-negative numbers).")
@click.option("--features", default=None, help="Comma-separated feature columns [every other column].")
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Slices to report.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Weight of error vs size in the score.")
@click.option("--min-sup", default=None, help="Minimum slice size: rows (N) or a fraction of rows (F) [⌈n/100⌉].")
@click.option("--max-level", type=click.IntRange(min=0), default=3, show_default=True,
              help="Most predicates per slice (0 = unlimited).")
@click.option("--bins", type=click.IntRange(min=2), default=10, show_default=True,
              help="Bins per numeric column with many values.")
@click.option("--binning", type=click.Choice(["quantile", "width"]), default="quantile", show_default=True)
@click.option("--drop-nulls", is_flag=True, help="Nulls form no slice (default: null is a level of its own).")
@click.option("--compat", type=click.Choice(["systemds"]), default=None,
              help="Reproduce SystemDS's sliceLine output exactly (its bound and top-K quirks).")
@click.option("--max-q", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Benjamini–Hochberg q-value at or below which a slice counts as significant.")
@click.option("--json", "as_json", is_flag=True, help="Print the slices as a JSON list, best first.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write OUT/slices.parquet and OUT/slices.json.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the search may use, e.g. 8G [80% of the memory available at start]; a lattice level "
                   "that would need more is refused before it starts, naming the --min-sup / --max-level that fit.")
def slices(table, error, features, k, alpha, min_sup, max_level, bins, binning, drop_nulls, compat, max_q, as_json,
           quiet, out_dir, max_memory):
    """Find the top-K weak slices of TABLE (Parquet or CSV) with SliceLine.

    A slice is a conjunction such as `gender = female AND age = child`; its score weighs
    how much higher its mean error is than the whole table's against how small it is.
    Every slice comes with an interval, a one-sided p-value against the rest of the data
    and a Benjamini–Hochberg q-value over all candidates the search evaluated.

    Cost: the search goes level by level, one more predicate per level up to
    --max-level. With f features of d values each, level L can hold up to
    C(f, L)·d^L candidates; slices smaller than --min-sup are never extended, and
    --min-sup and --max-level are what keep the lattice small. Time: level 2 counts
    every pair of a row's f codes once (rows × f²), level 3 does so once more for
    each one-predicate slice the row is in (rows × f³): each level costs about a
    factor f more. Memory: two bytes per row and feature for the codes plus about
    40 bytes per evaluated candidate (kept for the q-values); each level's
    candidates are counted before it runs, and a level that would exceed
    --max-memory is refused with the --min-sup / --max-level that would fit.

    \b
    Example:
      clipengine slices run/errors.parquet --error error --features gender,age,box_height
      clipengine slices adult.csv --error wrong --min-sup 32 --json --out slices/
    """
    import json

    from clipengine.config import SliceConfig
    from clipengine.slices import find_slices_with_config, read_table, write_slices

    config = SliceConfig(k=k, alpha=alpha, min_sup=_parse_min_sup(min_sup), max_level=max_level, bins=bins,
                         compat=compat, max_q=max_q, binning=binning, drop_nulls=drop_nulls, progress=not quiet,
                         max_memory=_parse_memory(max_memory))
    frame = read_table(table)
    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    result = find_slices_with_config(frame, error=error, config=config, features=names)
    if out_dir:
        write_slices(result, out_dir)
    if as_json:
        click.echo(json.dumps(result.to_records(), indent=2))
        return
    for name, reason in result.skipped_features.items():
        click.echo(f"skipped feature {name}: {reason}", err=True)
    click.echo(f"{result.n_rows} rows, mean error {result.error_mean:.4g}, "
               f"{result.n_evaluated} candidate slices evaluated (min_sup {result.params['min_sup']})")
    if len(result) == 0:
        click.echo(f"no slice is significant at q ≤ {max_q:g}: no slice of ≥ {result.params['min_sup']} rows "
                   f"scores above 0 (none has a clearly higher error than the whole table)")
        return
    if result.nothing_significant:
        click.echo(f"no slice is significant at q ≤ {max_q:g} (Benjamini–Hochberg over "
                   f"{result.n_evaluated} candidates): the top slices are what chance alone gives; "
                   f"use --max-q 1 to list them anyway")
        return
    shown = [i for i in range(len(result)) if result.significant[i]]
    header = f"{'#':>3} {'score':>7} {'size':>8} {'error':>8} {'95% interval':>19} {'q':>9}  slice"
    click.echo(header)
    for i in shown:
        low, high = result.ci_low[i], result.ci_high[i]
        click.echo(f"{i + 1:>3} {result.score[i]:>7.3f} {int(result.size[i]):>8} {result.error_mean_[i]:>8.4g} "
                   f"[{low:>8.4g}, {high:>8.4g}] {result.q_value[i]:>9.2g}  {result.describe(i)}")
    hidden = len(result) - len(shown)
    if hidden:
        click.echo(f"({hidden} more of the top {len(result)} not significant at q ≤ {max_q:g}; --max-q 1 shows them)")
