"""``clipengine slices``: options → ``SliceConfig`` → :func:`clipengine.slices.find.find_slices` → print."""

from __future__ import annotations

import click

from clipengine.cli.options import slice_config, slice_options


@click.command("slices")
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--error", "error", required=True, help="Column of per-row errors (0/1 or non-negative numbers).")
@click.option("--features", default=None, help="Comma-separated feature columns [every other column].")
@slice_options
@click.option("--json", "as_json", is_flag=True, help="Print the slices as a JSON list, best first.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write OUT/slices.parquet and OUT/slices.json.")
def slices(table, error, features, k, alpha, min_sup, max_level, bins, binning, drop_nulls, compat, max_q, as_json,
           quiet, out_dir):
    """Find the top-K weak slices of TABLE (Parquet or CSV) with SliceLine.

    A slice is a conjunction such as `gender = female AND age = child`; its score weighs
    how much higher its mean error is than the whole table's against how small it is.
    Every slice comes with an interval, a one-sided p-value against the rest of the data
    and a Benjamini–Hochberg q-value over all candidates the search evaluated.

    \b
    Example:
      clipengine slices run/errors.parquet --error error --features gender,age,box_height
      clipengine slices adult.csv --error wrong --min-sup 32 --json --out slices/
    """
    import json

    from clipengine.slices.find import find_slices_with_config, write_slices
    from clipengine.tables import check_error_column, read_table

    config = slice_config(k=k, alpha=alpha, min_sup=min_sup, max_level=max_level, bins=bins, binning=binning,
                          drop_nulls=drop_nulls, compat=compat, max_q=max_q, progress=not quiet)
    frame = read_table(table, what="table")
    check_error_column(frame, error, source=table)  # bad errors are named with the file
    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    result = find_slices_with_config(frame, error=error, config=config, features=names)
    if out_dir:
        from clipengine.artifacts import SLICES_JSON, SLICES_PARQUET, check_inputs_kept, locked

        check_inputs_kept(out_dir, [table], [SLICES_PARQUET, SLICES_JSON])
        with locked(out_dir):
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
