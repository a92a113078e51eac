"""Slice statistics: false alarms, power, honest estimates and label-noise correction, measured.

Not a timing benchmark: every part draws many synthetic datasets (or labelled samples) with a known
truth and prints how often clipengine's slice statistics are right, for both multiple-testing
families (``split``, the default, and ``lattice``):

    python bench/slice_stats.py --part null        # share of null datasets with any q ≤ 0.05 slice
    python bench/slice_stats.py --part power       # planted 2-/3-predicate slices found with q ≤ 0.05
    python bench/slice_stats.py --part honesty     # bias and coverage of the reported error rates
    python bench/slice_stats.py --part noise       # true-group estimates under label noise, 0–40 %
    python bench/slice_stats.py --part fashion --run runs/fashion-mnist   # Fashion-MNIST, truth known
    python bench/slice_stats.py --part all --run runs/fashion-mnist --json results.json

``--datasets`` scales every part (default 200 null datasets, 50 per power cell, 100 for honesty and
noise); the run's time is printed in the JSON (``seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

FAMILIES = ("split", "lattice")
BASE_RATE = 0.1
PLANTED_RATE = 0.4
PLANTED_SUPPORT = 0.02
N_FEATURES = 8


# ---- data with a known truth -----------------------------------------------------------------------


def null_frame(rng: np.random.Generator, n_rows: int, *, n_features: int = N_FEATURES) -> pl.DataFrame:
    """``n_features`` categorical features (2–6 levels, uniform) and 0/1 errors at BASE_RATE, independent."""
    columns = {f"f{j}": rng.integers(0, int(rng.integers(2, 7)), n_rows).astype(str) for j in range(n_features)}
    return pl.DataFrame({**columns, "error": (rng.random(n_rows) < BASE_RATE).astype(np.int64)})


def planted_frame(rng: np.random.Generator, n_rows: int, level: int, *,
                  n_features: int = N_FEATURES) -> tuple[pl.DataFrame, dict[str, str], np.ndarray]:
    """A null frame whose slice ``f0 = a AND … AND f{level-1} = a`` (PLANTED_SUPPORT of the rows in
    expectation) has error rate PLANTED_RATE. Returns the frame, the planted predicates and each row's
    error probability."""
    share = PLANTED_SUPPORT ** (1.0 / level)  # each planted predicate holds independently with this share
    columns = {}
    for j in range(n_features):
        levels = int(rng.integers(2, 7))
        if j < level:
            others = rng.integers(0, max(levels - 1, 1), n_rows).astype(str)
            columns[f"f{j}"] = np.where(rng.random(n_rows) < share, "a", np.char.add("b", others))
        else:
            columns[f"f{j}"] = rng.integers(0, levels, n_rows).astype(str)
    inside = np.ones(n_rows, bool)
    for j in range(level):
        inside &= columns[f"f{j}"] == "a"
    probability = np.where(inside, PLANTED_RATE, BASE_RATE)
    frame = pl.DataFrame({**columns, "error": (rng.random(n_rows) < probability).astype(np.int64)})
    return frame, {f"f{j}": "a" for j in range(level)}, probability


# ---- parts --------------------------------------------------------------------------------------------


def part_null(datasets: int, n_rows: int, seed: int) -> dict:
    """Share of null datasets with any q ≤ 0.05, per family × min_sup × k; and whether a slice's q-value
    ever changed with k."""
    from clipengine.slices.find import find_slices

    ks, min_sups = (5, 10, 50), (0.01, 0.05)
    alarms = {(f, s, k): 0 for f in FAMILIES for s in min_sups for k in ks}
    changed = {(f, s): 0 for f in FAMILIES for s in min_sups}
    for d in range(datasets):
        frame = null_frame(np.random.default_rng(seed + d), n_rows)
        for family in FAMILIES:
            for min_sup in min_sups:
                q_by_slice: dict[str, set] = {}
                for k in ks:
                    result = find_slices(frame, error="error", k=k, min_sup=min_sup, family=family)
                    alarms[family, min_sup, k] += bool(np.any(result.q_value <= 0.05))
                    for i in range(len(result)):
                        q_by_slice.setdefault(result.describe(i), set()).add(float(result.q_value[i]))
                changed[family, min_sup] += any(len(v) > 1 for v in q_by_slice.values())
        _tick("null", d + 1, datasets)
    return {"datasets": datasets, "rows": n_rows,
            "share_with_any_q_le_0.05": {f"{f}|min_sup={s}|k={k}": v / datasets for (f, s, k), v in alarms.items()},
            "datasets_where_a_q_value_changed_with_k": {f"{f}|min_sup={s}": v for (f, s), v in changed.items()}}


def part_power(datasets: int, sizes: list[int], seed: int, test_fractions: tuple[float, ...] = (0.5,)) -> dict:
    """Share of datasets whose planted slice is reported with q ≤ 0.05, per family × level × rows (the
    split family once per held-out share in ``test_fractions``)."""
    from clipengine.slices.find import find_slices

    designs = [(f"split@{t:g}" if len(test_fractions) > 1 else "split", "split", t) for t in test_fractions]
    designs.append(("lattice", "lattice", 0.5))
    found = {}
    for n_rows in sizes:
        for level in (2, 3):
            hits = {name: 0 for name, _, _ in designs}
            for d in range(datasets):
                frame, planted, _ = planted_frame(np.random.default_rng(seed + 1000 * level + d), n_rows, level)
                for name, family, fraction in designs:
                    result = find_slices(frame, error="error", family=family, test_fraction=fraction)
                    hits[name] += any(p == planted and q <= 0.05 for p, q in zip(result.predicates, result.q_value))
            for name, _, _ in designs:
                found[f"{name}|level={level}|rows={n_rows}"] = hits[name] / datasets
            _tick(f"power {n_rows} rows, level {level}", 1, 1)
    return {"datasets": datasets, "share_found_with_q_le_0.05": found}


def part_honesty(datasets: int, n_rows: int, seed: int) -> dict:
    """Bias and 95 % coverage of the reported error rates of the top-10 slices against each slice's
    expected error rate under the generator (planted 2-predicate data and null data)."""
    from clipengine.slices.find import find_slices
    from clipengine.slices.stats import wilson_interval

    out = {}
    for kind in ("null", "planted"):
        rows = {f: {"bias": [], "covered": [], "covered_unadjusted": [], "top1_bias": []} for f in FAMILIES}
        for d in range(datasets):
            rng = np.random.default_rng(seed + 7 * d)
            if kind == "null":
                frame, probability = null_frame(rng, n_rows), np.full(n_rows, BASE_RATE)
            else:
                frame, _, probability = planted_frame(rng, n_rows, 2)
            for family in FAMILIES:
                result = find_slices(frame, error="error", k=10, family=family, max_q=1.0)
                for i in range(len(result)):
                    expected = probability[result.row_mask(i)].mean()
                    rows[family]["bias"].append(result.error_mean_[i] - expected)
                    rows[family]["covered"].append(result.ci_low[i] <= expected <= result.ci_high[i])
                    low, high = wilson_interval(np.array([result.test_error_sum[i]]), np.array([result.test_size[i]]))
                    rows[family]["covered_unadjusted"].append(low[0] <= expected <= high[0])
                    if i == 0:
                        rows[family]["top1_bias"].append(result.error_mean_[i] - expected)
            _tick(f"honesty {kind}", d + 1, datasets)
        for family, r in rows.items():
            out[f"{kind}|{family}"] = {
                "slices": len(r["bias"]),
                "mean_bias": float(np.mean(r["bias"])) if r["bias"] else None,
                "top1_mean_bias": float(np.mean(r["top1_bias"])) if r["top1_bias"] else None,
                "coverage_reported": float(np.mean(r["covered"])) if r["covered"] else None,
                "coverage_plain_95_wilson": float(np.mean(r["covered_unadjusted"])) if r["covered"] else None,
            }
    return {"datasets": datasets, "rows": n_rows, "results": out}


KINDS = ("A", "B", "C", "D")
KIND_SHARES = (0.4, 0.3, 0.2, 0.1)


def noisy_population(rng: np.random.Generator, n_rows: int, flip: float, correlated: bool):
    """Items with a true attribute ``kind`` and an exact feature ``light``; the model's errors depend on
    both; the predicted ``kind`` is the true one replaced by a random other class with probability
    ``flip`` (``correlated``: three times as often on erroneous items, less on the others, same mean)."""
    kind = rng.choice(len(KINDS), n_rows, p=KIND_SHARES)
    light = rng.random(n_rows) < 0.5
    probability = 0.08 + 0.25 * (kind == 3) + 0.12 * ((kind == 2) & light)
    error = (rng.random(n_rows) < probability).astype(np.int64)
    if correlated:
        on_error = min(3 * flip, 0.95)
        rate = error.mean()
        on_rest = max((flip - rate * on_error) / (1 - rate), 0.0)
        flips = rng.random(n_rows) < np.where(error > 0, on_error, on_rest)
    else:
        flips = rng.random(n_rows) < flip
    other = (kind + rng.integers(1, len(KINDS), n_rows)) % len(KINDS)
    predicted = np.where(flips, other, kind)
    frame = pl.DataFrame({"path": [f"item{i}" for i in range(n_rows)], "kind": np.array(KINDS)[predicted],
                          "light": light, "error": error})
    return frame, np.array(KINDS)[kind], probability


def part_noise(datasets: int, n_rows: int, n_labelled: int, seed: int) -> dict:
    """Coverage and bias of corrected vs uncorrected estimates of the true group's error rate, label
    flip rates 0–40 %, flips independent of or correlated with the model's errors, uniform and
    unequal-probability samples."""
    from clipengine.slices.corrected import LabelledSample
    from clipengine.slices.find import find_slices

    table = {}
    for correlated in (False, True):
        for flip in (0.0, 0.1, 0.2, 0.3, 0.4):
            for design in ("uniform", "unequal"):
                stats = {"corrected_cover": [], "corrected_bias": [], "plain_cover": [], "plain_bias": [],
                         "corrected_width": [], "missing": 0}
                for d in range(datasets):
                    rng = np.random.default_rng(seed + 31 * d + int(flip * 100) + 7 * correlated)
                    frame, true_kind, probability = noisy_population(rng, n_rows, flip, correlated)
                    if design == "uniform":
                        inclusion = np.full(n_rows, n_labelled / n_rows)
                    else:  # predicted D's drawn four times as often (a focused sample)
                        raw = np.where(frame["kind"].to_numpy() == "D", 4.0, 1.0)
                        inclusion = np.minimum(raw * n_labelled / raw.sum(), 1.0)
                    drawn = np.flatnonzero(rng.random(n_rows) < inclusion)
                    sample = LabelledSample(rows=drawn, truth={"kind": true_kind[drawn].astype(object)},
                                            inclusion=inclusion[drawn])
                    result = find_slices(frame, error="error", features=["kind", "light"], k=10, max_q=1.0,
                                         min_sup=0.02, labels=sample)
                    light = frame["light"].to_numpy()
                    for i, predicates in enumerate(result.predicates):
                        if "kind" not in predicates:
                            continue
                        group = true_kind == predicates["kind"]
                        if "light" in predicates:
                            group &= light == predicates["light"]
                        expected = probability[group].mean()
                        stats["plain_cover"].append(result.ci_low[i] <= expected <= result.ci_high[i])
                        stats["plain_bias"].append(result.error_mean_[i] - expected)
                        if not np.isfinite(result.true_error_mean[i]):
                            stats["missing"] += 1
                            continue
                        stats["corrected_cover"].append(result.true_ci_low[i] <= expected <= result.true_ci_high[i])
                        stats["corrected_bias"].append(result.true_error_mean[i] - expected)
                        stats["corrected_width"].append(result.true_ci_high[i] - result.true_ci_low[i])
                key = f"{'correlated' if correlated else 'independent'}|flip={flip:.1f}|{design}"
                table[key] = {
                    "pairs": len(stats["plain_cover"]),
                    "corrected_coverage": _mean(stats["corrected_cover"]),
                    "corrected_mean_bias": _mean(stats["corrected_bias"]),
                    "corrected_mean_width": _mean(stats["corrected_width"]),
                    "uncorrected_coverage": _mean(stats["plain_cover"]),
                    "uncorrected_mean_bias": _mean(stats["plain_bias"]),
                    "no_estimate": stats["missing"],
                }
                _tick(f"noise {key}", 1, 1)
    return {"datasets": datasets, "rows": n_rows, "labelled": n_labelled, "results": table}


def part_fashion(run_dir: Path, samples: int, n_labelled: int, seed: int) -> dict:
    """Fashion-MNIST run (ConSE metadata, garment ≈ 24 % accurate): for each random labelled sample of
    ``n_labelled`` items, the corrected intervals of the top-10 (and top-50) slices that use predicted
    ``garment`` against the true group's error rate over all items (and over the held-out items)."""
    from clipengine.artifacts import ERROR_COLUMN, joined_features, read_joined
    from clipengine.slices.corrected import LabelledSample
    from clipengine.slices.find import find_slices

    frame, attributes, extra = read_joined(run_dir)
    features = joined_features(attributes, [c for c in ("ink",) if c in extra])  # what `clipengine run` slices on
    true_garment = frame["label"].to_numpy().astype(object)  # the dataset's true class of every item
    errors = frame[ERROR_COLUMN].to_numpy()
    out = {}
    for family in FAMILIES:
        rows = []
        for s in range(samples):
            rng = np.random.default_rng(seed + s)
            drawn = np.sort(rng.choice(frame.height, n_labelled, replace=False))
            sample = LabelledSample(rows=drawn, truth={"garment": true_garment[drawn]},
                                    inclusion=np.full(n_labelled, n_labelled / frame.height))
            result = find_slices(frame, error=ERROR_COLUMN, features=features, k=50, max_q=1.0, family=family,
                                 labels=sample)
            held_out = result._test_rows
            for i, predicates in enumerate(result.predicates):
                if "garment" not in predicates:
                    continue
                others = {f: v for f, v in predicates.items() if f != "garment"}
                group = (true_garment == predicates["garment"]) & _mask(frame, others, result.bounds[i])
                truth_all = errors[group].mean()
                truth_held = errors[group & held_out].mean() if held_out is not None else truth_all
                rows.append({
                    "sample": s, "rank": i + 1, "slice": result.describe(i), "size": int(result.size[i]),
                    "true_size": int(group.sum()), "true_size_estimate": _num(result.true_size[i]),
                    "truth_all": float(truth_all), "truth_held_out": float(truth_held),
                    "true_error_mean": _num(result.true_error_mean[i]),
                    "true_ci": [_num(result.true_ci_low[i]), _num(result.true_ci_high[i])],
                    "ci": [_num(result.ci_low[i]), _num(result.ci_high[i])],
                    "error_mean": _num(result.error_mean_[i]),
                })
            _tick(f"fashion {family}", s + 1, samples)
        out[f"{family}|top-10"] = _fashion_table([r for r in rows if r["rank"] <= 10])
        out[f"{family}|top-50"] = _fashion_table(rows)
        out[f"{family}|top-50"]["pairs_detail"] = rows
    return {"run": str(run_dir), "samples": samples, "labelled": n_labelled, "results": out}


def _fashion_table(rows: list[dict]) -> dict:
    def covered(row, key, target):
        low, high = row[key]
        return low is not None and low <= row[target] <= high

    estimated = [r for r in rows if r["true_error_mean"] is not None]
    return {
        "pairs": len(rows),
        "pairs_with_estimate": len(estimated),
        "corrected_coverage_all_items": _mean([covered(r, "true_ci", "truth_all") for r in estimated]),
        "corrected_coverage_held_out": _mean([covered(r, "true_ci", "truth_held_out") for r in estimated]),
        "uncorrected_coverage_all_items": _mean([covered(r, "ci", "truth_all") for r in rows]),
        "corrected_mean_width": _mean([r["true_ci"][1] - r["true_ci"][0] for r in estimated]),
        "corrected_mean_abs_error": _mean([abs(r["true_error_mean"] - r["truth_all"]) for r in estimated]),
        "uncorrected_mean_abs_error": _mean([abs(r["error_mean"] - r["truth_all"]) for r in rows]),
    }


# ---- helpers --------------------------------------------------------------------------------------------


def _mask(frame, predicates, bounds):
    from clipengine.slices.coding import predicate_mask

    return predicate_mask(frame, predicates, bounds)


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _tick(what: str, done: int, total: int) -> None:
    if done == total or done % 20 == 0:
        print(f"  {what}: {done}/{total}", file=sys.stderr, flush=True)




def _print_tables(report: dict) -> None:
    from clipengine.bench._machine import machine_line

    print(f"# slice statistics — {machine_line(report['machine'])}\n")
    if "null" in report:
        r = report["null"]
        print(f"## Null data: share of {r['datasets']} datasets ({r['rows']} rows) with any q ≤ 0.05\n")
        print("| family | min_sup | k = 5 | k = 10 | k = 50 | datasets where a q-value changed with k |")
        print("| --- | --- | --- | --- | --- | --- |")
        for family in FAMILIES:
            for s in (0.01, 0.05):
                cells = [f"{100 * r['share_with_any_q_le_0.05'][f'{family}|min_sup={s}|k={k}']:.1f} %" for k in (5, 10, 50)]
                print(f"| {family} | {s:g} | {' | '.join(cells)} | "
                      f"{r['datasets_where_a_q_value_changed_with_k'][f'{family}|min_sup={s}']} |")
        print()
    if "power" in report:
        r = report["power"]
        found = r["share_found_with_q_le_0.05"]
        sizes = sorted({int(key.split("rows=")[1]) for key in found})
        print(f"## Planted slices (support 2 %, error 0.1 → 0.4) found with q ≤ 0.05, {r['datasets']} datasets per cell\n")
        print("| family | predicates | " + " | ".join(f"{n:,} rows" for n in sizes) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
        for family in dict.fromkeys(key.split("|")[0] for key in found):
            for level in (2, 3):
                cells = [f"{100 * found[f'{family}|level={level}|rows={n}']:.0f} %" for n in sizes]
                print(f"| {family} | {level} | {' | '.join(cells)} |")
        print()
    if "honesty" in report:
        r = report["honesty"]
        print(f"## Reported error rates of the top-10 slices vs their expected rate ({r['datasets']} datasets, "
              f"{r['rows']} rows)\n")
        print("| data | family | slices | mean bias | top-1 mean bias | coverage of the reported interval | "
              "coverage of a plain 95 % Wilson interval |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for key, v in r["results"].items():
            kind, family = key.split("|")
            print(f"| {kind} | {family} | {v['slices']} | {_fmt(v['mean_bias'], 4)} | {_fmt(v['top1_mean_bias'], 4)} | "
                  f"{_pct(v['coverage_reported'])} | {_pct(v['coverage_plain_95_wilson'])} |")
        print()
    if "noise" in report:
        r = report["noise"]
        print(f"## True-group error rate under label noise ({r['datasets']} datasets of {r['rows']} items, "
              f"{r['labelled']} labelled; slices on predicted kind)\n")
        print("| noise | flip rate | sample | pairs | corrected coverage | corrected bias | corrected width | "
              "uncorrected coverage | uncorrected bias | no estimate |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, v in r["results"].items():
            noise, flip, design = key.split("|")
            print(f"| {noise} | {flip.split('=')[1]} | {design} | {v['pairs']} | {_pct(v['corrected_coverage'])} | "
                  f"{_fmt(v['corrected_mean_bias'], 4)} | {_fmt(v['corrected_mean_width'], 3)} | "
                  f"{_pct(v['uncorrected_coverage'])} | {_fmt(v['uncorrected_mean_bias'], 4)} | {v['no_estimate']} |")
        print()
    if "fashion" in report:
        r = report["fashion"]
        print(f"## Fashion-MNIST ({r['run']}): {r['samples']} labelled samples of {r['labelled']} items, "
              "the top slices that use predicted garment\n")
        print("| family | slices | (sample, slice) pairs | with an estimate | corrected coverage (all items) | "
              "corrected coverage (held-out items) | uncorrected coverage | corrected width | "
              "corrected mean abs. error | uncorrected mean abs. error |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, v in r["results"].items():
            family, top = key.split("|")
            print(f"| {family} | {top} | {v['pairs']} | {v['pairs_with_estimate']} | {_pct(v['corrected_coverage_all_items'])} | "
                  f"{_pct(v['corrected_coverage_held_out'])} | {_pct(v['uncorrected_coverage_all_items'])} | "
                  f"{_fmt(v['corrected_mean_width'], 3)} | {_fmt(v['corrected_mean_abs_error'], 3)} | "
                  f"{_fmt(v['uncorrected_mean_abs_error'], 3)} |")
        print()


def _fmt(value, digits) -> str:
    return "–" if value is None else f"{value:+.{digits}f}" if digits == 4 else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("null", "power", "honesty", "noise", "fashion", "all"), default="all")
    parser.add_argument("--datasets", type=int, default=None, help="datasets per cell (default: per part)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows of each null/honesty/noise dataset")
    parser.add_argument("--power-rows", default="5000,10000,20000,50000,100000")
    parser.add_argument("--test-fractions", default="0.5",
                        help="power: held-out shares to compare for the split family, e.g. 0.5,0.3")
    parser.add_argument("--run", type=Path, default=None, help="a Fashion-MNIST run directory (clipengine run)")
    parser.add_argument("--samples", type=int, default=20, help="labelled samples of the Fashion-MNIST run")
    parser.add_argument("--labelled", type=int, default=300, help="items per labelled sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    parts = ("null", "power", "honesty", "noise", "fashion") if args.part == "all" else (args.part,)
    from clipengine.bench._machine import machine_record

    report = {"machine": machine_record()}
    started = time.perf_counter()
    if "null" in parts:
        report["null"] = part_null(args.datasets or 200, args.rows, args.seed)
    if "power" in parts:
        sizes = [int(x) for x in args.power_rows.split(",")]
        fractions = tuple(float(x) for x in args.test_fractions.split(","))
        report["power"] = part_power(args.datasets or 50, sizes, args.seed, fractions)
    if "honesty" in parts:
        report["honesty"] = part_honesty(args.datasets or 100, args.rows, args.seed)
    if "noise" in parts:
        report["noise"] = part_noise(args.datasets or 100, args.rows, args.labelled, args.seed)
    if "fashion" in parts:
        if args.run is None:
            print("--part fashion needs --run RUN_DIR (clipengine run --dataset fashion-mnist)", file=sys.stderr)
            return 2
        report["fashion"] = part_fashion(args.run, args.samples, args.labelled, args.seed)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    sys.exit(main())
