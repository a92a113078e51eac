"""``clipengine coverage``: options → ``CoverageConfig`` → :func:`clipengine.coverage.stage.measure_coverage`."""

from __future__ import annotations

from pathlib import Path

import click

from clipengine.cli.options import coverage_config, coverage_options
from clipengine.config import DEFAULT_COVERAGE_LIMIT, DEFAULT_COVERAGE_MAX_LEVELS

TEXT_LIMIT = 25  # combinations listed on the terminal unless --limit says otherwise


@click.command("coverage")
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--features", default=None, help="Comma-separated feature columns [the ODD's features; for a run "
              "directory the run's (its schema's attributes and the dataset's own features); else every column "
              "but keys, errors and _prob/_margin].")
@coverage_options
@click.option("--against", type=click.Path(exists=True, path_type=str), default=None,
              help="Another run or table: combinations covered in one and not in the other, both ways.")
@click.option("--error", default=None, help="Error column for error rates per combination [error, when present].")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help=f"Most combinations listed [{DEFAULT_COVERAGE_LIMIT} in JSON and files; {TEXT_LIMIT} on the "
                   "terminal].")
@click.option("--max-levels", type=click.IntRange(min=1), default=DEFAULT_COVERAGE_MAX_LEVELS, show_default=True,
              help="Without an ODD, features with more distinct values are left out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write OUT/coverage.json and OUT/coverage.parquet.")
def coverage(source, features, t, min_count, odd, against, min_prob, soft, error, limit, max_levels, as_json, quiet,
             out_dir):
    """Which combinations of conditions SOURCE covers, misses or holds too thinly.

    SOURCE is a run directory (its metadata.parquet joined with errors.parquet) or a
    Parquet/CSV table. For every set of t features and every combination of their
    values, the items that show it; t-way coverage is covered / valid combinations.
    Missing and thin combinations are listed in words, thinnest first, with the count
    expected if the features were independent: "rare because both are rare" reads
    apart from "missing although both are common".

    \b
    Example:
      clipengine coverage runs/fashion-mnist --t 3 --min-count 5
      clipengine coverage table.parquet --odd odd.yaml --json --out coverage/
      clipengine coverage runs/tonight --against runs/last-month --features weather,time

    \b
    odd.yaml:
      features:
        weather: [clear, rain, fog, snow]
        time: [day, night]
        season: [winter, summer]
      exclude:
        - {weather: snow, season: summer}
    """
    import json

    from clipengine.coverage.inputs import read_coverage_input, run_features, run_values
    from clipengine.coverage.odd import load_odd
    from clipengine.coverage.stage import measure_coverage, write_coverage

    config = coverage_config(t=t, min_count=min_count, odd=odd, min_prob=min_prob, soft=soft,
                             limit=DEFAULT_COVERAGE_LIMIT if limit is None else limit, error=error,
                             max_levels=max_levels, progress=not quiet and not as_json)
    odd_spec = load_odd(odd) if odd else None
    if out_dir:  # before any work: never overwrite an input
        from clipengine.artifacts import COVERAGE_JSON, COVERAGE_PARQUET, check_inputs_kept

        given = [p for p in (source, against, odd) if p and not Path(p).is_dir()]
        check_inputs_kept(out_dir, given, [COVERAGE_JSON, COVERAGE_PARQUET])
    frame, is_run = read_coverage_input(source)
    other = read_coverage_input(against)[0] if against else None
    names = [f.strip() for f in features.split(",") if f.strip()] if features else None
    optional = names is None and odd_spec is None and is_run and run_features(source) is not None
    if optional:
        names = run_features(source)
    result = measure_coverage(frame, config=config, features=names, odd=odd_spec, against=other,
                              against_source=against, is_run=is_run, features_optional=optional,
                              known_values=run_values(source) if is_run else None)
    record = result.to_json() if out_dir or as_json else None
    if out_dir:
        from clipengine.artifacts import locked

        with locked(out_dir):
            write_coverage(result, out_dir, record=record)
    if as_json:
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    _print_text(result, source, TEXT_LIMIT if limit is None else limit)


def _pct(covered: int, valid: int) -> str:
    return f"{100.0 * covered / valid:.1f} %" if valid else "–"


def _print_text(result, source: str, limit: int) -> None:
    params = result.params
    click.echo(f"coverage of {source}: {result.n_rows:,} items, {len(result.features)} features "
               f"({', '.join(result.features)}), min count {params['min_count']}")
    if result.odd is not None:
        click.echo(f"{params['odd']}: {len(result.odd['features'])} features, "
                   f"{len(result.odd['exclude'])} excluded combination(s)")
    if params["min_prob"] is not None:
        click.echo(f"labels with probability < {params['min_prob']:g} count as unknown")
    if params["soft"]:
        click.echo("counts are expected counts: each item weighs the product of its labels' probabilities")
    for name, reason in result.skipped_features.items():
        click.echo(f"left out feature {name}: {reason}", err=True)
    both = params["min_prob"] is not None or params["soft"]
    click.echo(f"{'t':>3} {'covered / valid':>17} {'coverage':>9} {'complete sets':>14}"
               + (f" {'by every label':>15}" if both else ""))
    for entry in result.coverage():
        share = _pct(entry["covered"], entry["valid"])
        line = (f"{entry['t']:>3} {entry['covered']:>8,} / {entry['valid']:<6,} {share:>9}"
                f" {entry['complete_sets']:>6,} / {entry['sets']:<6,}")
        if both:
            line += f" {_pct(entry['covered_by_labels'], entry['valid']):>15}"
        click.echo(line)
    if params["odd"]:
        details = [f"{feature} = {value}: {n}" for feature, values in result.out_of_odd_values.items()
                   for value, n in values.items()]
        details += [f"excluded {result.describe(item['predicates'])}: {item['count']}"
                    for item in result.excluded_present]
        click.echo(f"out of the ODD: {result.out_of_odd:,} items" + (f" ({'; '.join(details)})" if details else ""))
    missing, total = result.missing(limit)
    if total == 0:
        click.echo(f"every valid combination has at least {params['min_count']} item(s)")
    else:
        with_errors = result.error_column is not None
        click.echo(f"missing or thin (fewer than {params['min_count']} items): {total:,} combinations, thinnest first"
                   + (f"; the first {len(missing)}" if len(missing) < total else ""))
        header = f"{'count':>9} {'expected':>10}"
        if with_errors:
            header += f" {'errors':>7} {'rate [95% interval]':>22}"
        click.echo(header + "  combination")
        for item in missing:
            count = item["count"]
            line = f"{count:>9,}" if isinstance(count, int) else f"{count:>9.2f}"
            line += f" {item['expected']:>10.2f}"
            if with_errors:
                if "error_rate" in item:
                    line += (f" {item['errors']:>7.4g} {item['error_rate']:>6.3f} "
                             f"[{item['ci_low']:.3f}, {item['ci_high']:.3f}]")
                else:
                    line += " " * 30
            click.echo(line + "  " + result.describe(item["predicates"]) + ("  (implied by a smaller one)"
                                                                            if item.get("implied") else ""))
    differences = result.differences(limit)
    if differences is not None:
        click.echo(f"against {differences['source']} ({differences['rows']:,} items):")
        for entry in differences["coverage"]:
            click.echo(f"{entry['t']:>3}: covered here {entry['covered_this']:,}, there {entry['covered_other']:,}; "
                       f"here and not there {entry['this_not_other']:,}, "
                       f"there and not here {entry['other_not_this']:,}")
        titles = (("this_not_other", "covered here, not there"), ("other_not_this", "covered there, not here"))
        for key, title in titles:
            listing = differences[key]
            if listing["total"]:
                click.echo(f"{title} ({listing['total']:,}):")
                for item in listing["combinations"]:
                    click.echo(f"  {_num(item['count']):>9} {_num(item['count_other']):>9}  "
                               f"{result.describe(item['predicates'])}")


def _num(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.2f}"
