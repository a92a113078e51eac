"""``clipengine slices``: options → ``SliceConfig`` → :func:`clipengine.slices.find.find_slices` → print."""

from __future__ import annotations

import click

from clipengine.cli.options import labels_option, slice_config, slice_options


@click.command("slices")
@click.argument("table", type=click.Path(exists=True, path_type=str))
@click.option("--error", "error", default=None,
              help="Column of per-row errors (0/1 or non-negative numbers) [a run directory: its error column].")
@click.option("--features", default=None,
              help="Comma-separated feature columns [a table: every other column; a run: what the run sliced on].")
@slice_options
@labels_option
@click.option("--json", "as_json", is_flag=True, help="Print the slices as a JSON list, best first.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write OUT/slices.parquet and OUT/slices.json.")
def slices(table, error, features, k, alpha, min_sup, max_level, bins, binning, drop_nulls, compat, max_q, family,
           family_size, test_fraction, split_seed, max_memory, labels, as_json, quiet, out_dir):
    """Find the top-K weak slices of TABLE (Parquet or CSV, or a run directory) with SliceLine.

    A slice is a conjunction such as `gender = female AND age = child`; its score weighs
    how much higher its mean error is than the whole table's against how small it is.
    By default SliceLine searches half of the rows (drawn at random) and every slice it
    finds is tested and estimated on the other half: its error rate and interval are
    not inflated by the search, and its Benjamini–Hochberg q-value (over the slices the
    search found) does not depend on --k. With --labels, a labelled sample corrects each
    slice for label noise: its true group's size and error rate, and "not confirmed"
    where that interval does not lie above the overall error rate (a table needs the
    labels' key columns, path [and box]).

    Cost: the search goes level by level, one more predicate per level up to
    --max-level. With f features of d values each, level L can hold up to
    C(f, L)·d^L candidates; slices smaller than --min-sup are never extended, and
    --min-sup and --max-level are what keep the lattice small. Time: level 2 counts
    every pair of a row's f codes once (rows × f²), level 3 does so once more for
    each one-predicate slice the row is in (rows × f³): each level costs about a
    factor f more. Memory: one byte per row and feature for the codes (two when
    a feature has more than 256 values) plus about 40 bytes per evaluated candidate (kept for the q-values); each level's
    candidates are counted before it runs, and a level that would exceed
    --max-memory is refused with the --min-sup / --max-level that would fit.

    \b
    Example:
      clipengine slices run/errors.parquet --error error --features gender,age,box_height
      clipengine slices adult.csv --error wrong --min-sup 32 --json --out slices/
      clipengine slices runs/fashion-mnist --labels labels.csv
      clipengine slices adult.csv --error wrong --compat systemds --family lattice
    """
    import json
    from pathlib import Path

    from clipengine.errors import ClipengineError
    from clipengine.slices.find import find_slices_with_config, write_slices

    config = slice_config(k=k, alpha=alpha, min_sup=min_sup, max_level=max_level, bins=bins, binning=binning,
                          drop_nulls=drop_nulls, compat=compat, max_q=max_q, family=family, family_size=family_size,
                          test_fraction=test_fraction, split_seed=split_seed, max_memory=max_memory,
                          progress=not quiet)
    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    if Path(table).is_dir():
        frame, error, default_features, sample = _run_table(Path(table), error, labels)
        names = names or default_features
    else:
        from clipengine.tables import check_error_column, read_table

        if error is None:
            raise ClipengineError(f"{table}: name the error column with --error")
        frame = read_table(table, what="table")
        check_error_column(frame, error, source=table)  # bad errors are named with the file
        sample = None
        if labels is not None:
            from clipengine.slices.corrected import read_sample

            sample = read_sample(labels, frame)
            if names is None:  # the key columns identify items; they are no features
                names = [c for c in frame.columns if c not in (error, "path", "box")]
    result = find_slices_with_config(frame, error=error, config=config, features=names, labels=sample)
    if out_dir:
        from clipengine.artifacts import SLICES_JSON, SLICES_PARQUET, check_inputs_kept, locked

        check_inputs_kept(out_dir, [table, *([labels] if labels else [])], [SLICES_PARQUET, SLICES_JSON])
        with locked(out_dir):
            write_slices(result, out_dir)
    if as_json:
        click.echo(json.dumps(result.to_records(), indent=2))
        return
    _print(result, max_q)


def _run_table(run_dir, error, labels):
    """A run directory's joined table, its error column, the features it was sliced on and its labels."""
    from clipengine.artifacts import ERROR_COLUMN, SLICES_JSON, joined_features, read_joined, read_json_file
    from clipengine.errors import ClipengineError
    from clipengine.slices.find import read_run_labels

    frame, attributes, extra = read_joined(run_dir)
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no encoded item has an error row")
    error = error or ERROR_COLUMN
    try:  # what the run sliced on (any format of slices.json names its features)
        summary = read_json_file(run_dir / SLICES_JSON)
        features = [*summary.get("features", []), *summary.get("skipped_features", {})]
    except (ClipengineError, AttributeError):  # not sliced yet: the attributes and every dataset column
        features = joined_features(attributes, extra)
    features = [f for f in features if f in frame.columns and f != error]
    sample = read_run_labels(run_dir, frame, labels) if labels is not None else None
    return frame, error, features, sample


def _print(result, max_q) -> None:
    for name, reason in result.skipped_features.items():
        click.echo(f"skipped feature {name}: {reason}", err=True)
    family = result.family
    where = (f"searched {family.get('search_rows')} rows, tested on the {family.get('test_rows')} held-out rows"
             if family.get("design") == "split" else "searched and tested on every row")
    click.echo(f"{result.n_rows} rows, mean error {result.error_mean:.4g}, {result.n_evaluated} candidate slices "
               f"evaluated (min_sup {result.params['min_sup']}); {where}; family of {result.n_family} slices")
    if result.labels is not None:
        corrected = ", ".join(result.labels["features"]) or "none of the features"
        click.echo(f"corrected by {result.labels['labelled_items']} labelled items ({corrected}; other predicates "
                   "exact)")
    if len(result) == 0:
        click.echo(f"no slice is significant at q ≤ {max_q:g}: no slice of ≥ {result.params['min_sup']} rows "
                   f"scores above 0 (none has a clearly higher error than the whole table)")
        return
    if result.nothing_significant:
        click.echo(f"no slice is significant at q ≤ {max_q:g} (Benjamini–Hochberg over "
                   f"{result.n_family} slices): the top slices are what chance alone gives; "
                   f"use --max-q 1 to list them anyway")
        return
    shown = [i for i in range(len(result)) if result.significant[i]]
    level = f"{percent_below_100(result.confidence)}% interval"
    header = f"{'#':>3} {'score':>7} {'size':>8} {'error':>8} {level:>19} {'q':>9}"
    if result.labels is not None:
        header += f" {'true error':>10} {'true interval':>19} {'':>13}"
    click.echo(header + "  slice")
    confirmed = result.confirmed
    for i in shown:
        low, high = result.ci_low[i], result.ci_high[i]
        line = (f"{i + 1:>3} {result.score[i]:>7.3f} {int(result.size[i]):>8} {result.error_mean_[i]:>8.4g} "
                f"[{low:>8.4g}, {high:>8.4g}] {result.q_value[i]:>9.2g}")
        if result.labels is not None:
            mark = "not confirmed" if confirmed[i] is False else ""
            line += (f" {result.true_error_mean[i]:>10.4g} [{result.true_ci_low[i]:>8.4g}, "
                     f"{result.true_ci_high[i]:>8.4g}] {mark:>13}")
        click.echo(f"{line}  {result.describe(i)}")
    hidden = len(result) - len(shown)
    if hidden:
        click.echo(f"({hidden} more of the top {len(result)} not significant at q ≤ {max_q:g}; --max-q 1 shows them)")


def percent_below_100(fraction: float) -> str:
    """``fraction`` as a percentage to 4 significant digits, with more decimals where those would round a
    level below 1 up to 100: 0.95 → "95", 0.975 → "97.5", 0.999987 → "99.999"."""
    text = f"{100 * fraction:.4g}"
    decimals = 2
    while fraction < 1 and float(text) >= 100 and decimals < 9:
        decimals += 1
        text = f"{100 * fraction:.{decimals}f}"
    return text
