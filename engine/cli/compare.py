"""``clipengine compare``: two run directories → what changed (slices, items, drift) → exit code for CI."""

from __future__ import annotations

import sys

import click

from clipengine import config as defaults

FAIL_ON_CHOICES = ("worse", "new", "drift", "none")


def _parse_fail_on(ctx: click.Context, param: click.Parameter, values) -> tuple[str, ...]:
    """``--fail-on worse --fail-on drift`` or ``--fail-on worse,drift``; ``none`` (the default) alone."""
    kinds: list[str] = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in FAIL_ON_CHOICES:
                raise click.BadParameter(f"{part!r} is not one of {', '.join(FAIL_ON_CHOICES)}", param_hint="--fail-on")
            kinds.append(part)
    if "none" in kinds and len(set(kinds)) > 1:
        raise click.BadParameter("'none' cannot be combined with other kinds", param_hint="--fail-on")
    return tuple(dict.fromkeys(k for k in kinds if k != "none"))


@click.command("compare")
@click.argument("old_run", type=click.Path(path_type=str))
@click.argument("new_run", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object on stdout.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write OUT/compare.json and OUT/compare_items.parquet (OUT may be NEW_RUN: its report "
                   "then shows the comparison).")
@click.option("--fail-on", "fail_on", multiple=True, callback=_parse_fail_on, metavar="worse|new|drift|none",
              help="Exit 1 when the comparison finds this (repeat or comma-separate kinds) [default: none].")
@click.option("--max-q", type=click.FloatRange(0, 1, min_open=True), default=defaults.DEFAULT_MAX_Q, show_default=True,
              help="Benjamini–Hochberg q-value at or below which a change counts.")
@click.option("--min-diff", type=click.FloatRange(min=0), default=defaults.DEFAULT_MIN_DIFF, show_default=True,
              help="Smallest change of a slice's error rate (absolute: 0.02 = 2 points) that counts.")
@click.option("--min-psi", type=click.FloatRange(min=0), default=defaults.DEFAULT_MIN_PSI, show_default=True,
              help="Smallest population stability index at which an attribute counts as drifted.")
def compare(old_run, new_run, as_json, out_dir, fail_on, max_q, min_diff, min_psi):
    """Compare NEW_RUN with OLD_RUN (two run directories of `clipengine run`): which slices got
    worse or better, which are new or gone, which items turned into errors and back, and how the
    data drifted.

    \b
    Slices compared: both runs' reported slices, every attribute value, and the top slices of a
    search for where item errors changed (where the runs share items), each evaluated on both runs
    with the old run's bins. Per slice: error rate in each run, the change with a 95 % interval, a
    two-sided p-value (paired by item where both runs hold the same items: McNemar mid-p for 0/1
    errors, paired t otherwise; Fisher's exact test or Welch otherwise) and a Benjamini–Hochberg
    q-value. A slice is worse/better when q ≤ --max-q and the change is at least --min-diff; new:
    no item in the old run; gone: none in the new. Drift: per attribute, χ² test (q-values) and
    population stability index. Attributes labelled by different models or schema entries, and
    errors of different kinds, are not compared, and the output says so.

    \b
    Exit status: 0, or 1 when --fail-on finds something (one line per finding on stderr); 2 for
    an error (a missing run, an unreadable file).

    \b
    Example:
      clipengine compare runs/2024-05-01 runs/2024-05-02
      clipengine compare runs/yesterday runs/today --fail-on worse --min-diff 0.02 --json > changes.json
      clipengine compare runs/yesterday runs/today --fail-on worse,drift --min-psi 0.1 --out runs/today
    """
    import json

    from clipengine.compare.stage import compare_runs, write_comparison
    from clipengine.config import CompareConfig

    config = CompareConfig(max_q=max_q, min_diff=min_diff, min_psi=min_psi)
    comparison = compare_runs(old_run, new_run, config)
    if out_dir:
        from clipengine import artifacts

        inputs = [f"{run}/{name}" for run in (old_run, new_run) for name in artifacts.COMPARED_INPUTS]
        artifacts.check_inputs_kept(out_dir, inputs, [artifacts.COMPARE_JSON, artifacts.COMPARE_ITEMS])
        with artifacts.locked(out_dir):
            write_comparison(out_dir, comparison)
    if as_json:
        click.echo(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print(comparison, config)
    findings = comparison.findings(fail_on) if fail_on else []
    for record in findings:
        click.echo(f"clipengine compare: {finding_line(record, comparison.facts.get('binary_errors', True))}", err=True)
    if findings:
        sys.exit(1)


def _rate(value, binary: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} %" if binary else f"{value:.4g}"


def _change(value, binary: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if binary else f"{value:+.4g}"


def _q(value) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def describe(predicates: dict) -> str:
    return " AND ".join(f"{k} = {'null' if v is None else v}" for k, v in predicates.items())


def finding_line(record: dict, binary: bool) -> str:
    """One line for a finding: a slice that got worse, a new weak slice, a drifted attribute."""
    if "attribute" in record:
        return (f"drift: {record['attribute']}: PSI {record['psi']:.3f}, q = {_q(record['q_value'])}")
    unit = " points" if binary else ""
    interval = f"{_change(record['ci_low'], binary)} to {_change(record['ci_high'], binary)}"
    if record["status"] == "new":
        return (f"new: {describe(record['predicates'])}: {record['new_size']} items, error "
                f"{_rate(record['new_error_mean'], binary)}, {_change(record['diff'], binary)}{unit} above the rest "
                f"(95 % interval {interval}), q = {_q(record['q_value'])}")
    return (f"{record['status']}: {describe(record['predicates'])}: {_rate(record['old_error_mean'], binary)} → "
            f"{_rate(record['new_error_mean'], binary)} ({_change(record['diff'], binary)}{unit}, 95 % interval "
            f"{interval}), q = {_q(record['q_value'])}")


def _print(comparison, config) -> None:
    facts = comparison.facts
    binary = facts.get("binary_errors", True)
    old, new, items = facts["old"], facts["new"], facts["items"]
    click.echo(f"{old['run']} → {new['run']}: {old['items']:,} → {new['items']:,} items ({items['matched']:,} in both), "
               f"error {_rate(old['error_mean'], binary)} → {_rate(new['error_mean'], binary)}")
    for mismatch in comparison.mismatches:
        click.echo(f"  not compared: {mismatch['what']} {mismatch['name']}: {mismatch['reason']}")
    counts = {status: sum(1 for r in comparison.slices if r["status"] == status)
              for status in ("worse", "better", "new", "gone", "unchanged")}
    click.echo(f"slices: {counts['worse']} worse, {counts['better']} better, {counts['new']} new, {counts['gone']} gone, "
               f"{counts['unchanged']} without a change at q ≤ {config.max_q:g}"
               + (f" and ≥ {config.min_diff:g}" if config.min_diff else ""))
    for record in comparison.slices:
        if record["status"] in ("worse", "better") or (record["status"] == "new" and record["finding"]):
            click.echo(f"  {finding_line(record, binary)}")
    drifted = [r for r in comparison.drift if r["finding"]]
    click.echo(f"drift: {len(drifted)} of {len(comparison.drift)} attributes")
    for record in drifted:
        click.echo(f"  {finding_line(record, binary)}")
    if items["matched"]:
        click.echo(f"items: {items['newly_failing']:,} turned into errors, {items['fixed']:,} turned correct "
                   f"(of {items['matched']:,} in both runs)")
