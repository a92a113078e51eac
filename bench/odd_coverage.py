"""Coverage: the whole ``clipengine coverage`` command and its counting kernel vs a NumPy bincount reference.

Generates a table (``--rows`` × ``--features`` string columns with 2–6 values each, a few planted
missing combinations, a 0/1 ``error`` column) as Parquet, then for each t:

- the whole command a user types, ``clipengine coverage TABLE --t T --out DIR --json --quiet``, in a
  fresh process: cold (an empty Numba cache, so compilation is included) and warm (the same cache),
  wall time and the process's CPU time (on a loaded machine the wall time grows, the CPU time little);
- the kernel alone (:func:`clipengine.kernels.coverage.count_combinations`, every t' ≤ T, compiled
  beforehand) on the coded columns;
- the NumPy reference at its best: per feature set ``np.bincount`` of the mixed-radix code, the code
  of the first t − 1 features computed once per prefix and reused, the sets split over
  ``--reference-procs`` processes. Beyond ``--reference-sets`` sets it times a random sample of
  prefixes and scales by the number of sets (stated); its counts are checked against the kernel's.

Each runs in its own child process; the parent prints wall times, each child's peak memory (maxrss
from ``wait4``), ratios, the CPU model, its AVX-512 / VPOPCNTDQ / AMX flags, the cores and the date.

    python bench/odd_coverage.py                       # 1,000,000 × 40, t = 2, 3, 4
    python bench/odd_coverage.py --t 3 --rows 200000   # smaller
Run under the benchmark lock on a quiet machine: flock /tmp/clipengine-bench.lock python bench/odd_coverage.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipengine.bench._install import compile_clipengine
from clipengine.bench._machine import machine_line

# not named coverage.py: a script's folder comes first on sys.path, and numba imports the `coverage` package
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VALUE_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


# ---- machine --------------------------------------------------------------------------------------




# ---- data (child) ----------------------------------------------------------------------------------


def make_table(rows: int, features: int, seed: int, folder: Path) -> dict:
    """The table as Parquet (string columns f00.., a 0/1 ``error``) and its codes as ``codes.npy``."""
    import polars as pl

    rng = np.random.default_rng(seed)
    domains = rng.integers(2, 7, features)
    codes = np.empty((features, rows), np.int16)
    for j, d in enumerate(domains):
        codes[j] = rng.integers(0, d, rows)
    # planted holes: one pair, one triple and one quadruple never occur
    planted = [((0, 1), (1, 1)), ((2, 3, 4), (0, 0, 0)), ((5, 6, 7, 8), (1, 0, 1, 0))]
    for feats, values in planted:
        if max(feats) < features:
            hit = np.all(np.stack([codes[f] == v for f, v in zip(feats, values)]), axis=0)
            last = feats[-1]
            codes[last, hit] = (values[-1] + 1) % domains[last]
    z = -2.2 + 0.8 * (codes[min(9, features - 1)] == 0)
    error = (rng.random(rows) < 1 / (1 + np.exp(-z))).astype(np.int8)
    columns = {}
    for j, d in enumerate(domains):
        names = np.array(VALUE_NAMES[:d])
        columns[f"f{j:02d}"] = pl.Series(names[codes[j]])
    columns["error"] = pl.Series(error)
    pl.DataFrame(columns).write_parquet(folder / "table.parquet")
    # the command numbers values in sorted order: the kernel gets the same codes
    np.save(folder / "codes.npy", np.stack([_sorted_codes(codes[j], d) for j, d in enumerate(domains)]))
    np.save(folder / "domains.npy", domains)
    return {"rows": rows, "features": features, "values": int(domains.sum()), "error_rate": float(error.mean()),
            "planted": len([p for p in planted if max(p[0]) < features])}


def _sorted_codes(column: np.ndarray, d: int) -> np.ndarray:
    names = list(VALUE_NAMES[:d])
    rank = {name: i for i, name in enumerate(sorted(names))}
    remap = np.array([rank[name] for name in names], np.int16)
    return remap[column]


# ---- workers (children) ----------------------------------------------------------------------------


def worker_kernel(folder: Path, t: int) -> dict:
    sys.path.insert(0, str(REPO))
    from clipengine.kernels.coverage import count_combinations

    codes, domains = np.load(folder / "codes.npy"), np.load(folder / "domains.npy")
    count_combinations(codes[:, :4096], domains, t)  # compile / load the cached code first
    seconds = math.inf
    for _ in range(2):  # the best of two: the first pays for page faults of the fresh arrays
        start = time.perf_counter()
        levels = count_combinations(codes, domains, t)
        seconds = min(seconds, time.perf_counter() - start)
    plan, counts = levels[-1]
    np.save(folder / f"kernel_t{t}.npy", counts)
    np.save(folder / f"sets_t{t}.npy", plan.sets)
    np.save(folder / f"offsets_t{t}.npy", plan.set_offsets)
    return {"time": seconds, "combinations": int(sum(p.n_combinations for p, _ in levels)), "sets": plan.n_sets}


def _reference_groups(args) -> tuple[float, list]:
    codes, domains, groups, t = args
    out = []
    start = time.process_time()
    for prefix, lasts in groups:
        code = np.zeros(codes.shape[1], np.int64)
        for f in prefix:
            code *= int(domains[f])
            code += codes[f]
        for last in lasts:
            d = int(domains[last])
            size = int(np.prod(domains[list(prefix)])) * d
            out.append((tuple(prefix) + (last,), np.bincount(code * d + codes[last], minlength=size)))
    return time.process_time() - start, out


def worker_reference(folder: Path, t: int, procs: int, max_sets: int, seed: int) -> dict:
    import itertools
    from multiprocessing import get_context

    codes = np.load(folder / "codes.npy").astype(np.int64)
    domains = np.load(folder / "domains.npy")
    f = codes.shape[0]
    prefixes = list(itertools.combinations(range(f), t - 1))
    groups = [(p, list(range((p[-1] + 1) if p else 0, f))) for p in prefixes]
    groups = [g for g in groups if g[1]]
    total_sets = sum(len(g[1]) for g in groups)
    sampled = groups
    if total_sets > max_sets:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(groups))
        sampled, n = [], 0
        for i in order:
            sampled.append(groups[i])
            n += len(groups[i][1])
            if n >= max_sets:
                break
    n_sampled = sum(len(g[1]) for g in sampled)
    parts = [sampled[i::procs] for i in range(procs)]
    start = time.perf_counter()
    if procs == 1:
        results = [_reference_groups((codes, domains, parts[0], t))]
    else:
        with get_context("fork").Pool(procs) as pool:
            results = pool.map(_reference_groups, [(codes, domains, part, t) for part in parts])
    seconds = time.perf_counter() - start
    # agreement with the kernel on the sets computed here
    kernel = np.load(folder / f"kernel_t{t}.npy") if (folder / f"kernel_t{t}.npy").exists() else None
    agree = None
    if kernel is not None:
        sets = np.load(folder / f"sets_t{t}.npy")
        offsets = np.load(folder / f"offsets_t{t}.npy")
        index = {tuple(s): i for i, s in enumerate(sets.tolist())}
        agree = all(np.array_equal(kernel[offsets[index[key]]: offsets[index[key] + 1]], counts)
                    for _, part in results for key, counts in part)
    return {"time": seconds * total_sets / n_sampled, "measured": seconds, "sets": total_sets, "sampled": n_sampled,
            "agree": agree}


def run_child(cmd: list[str], env: dict | None = None) -> tuple[int, float, int, str, float]:
    """``(exit code, wall seconds, peak bytes, output, CPU seconds)`` of a child process; CPU time
    (user + system, all threads) is what a loaded machine cannot inflate much."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    cpu = rusage.ru_utime + rusage.ru_stime
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, rusage.ru_maxrss * 1024, output, cpu


def worker(kind: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, *args]
    code, whole, peak, output, cpu = run_child(cmd)
    if code != 0:
        return {"error": output[-2000:], "peak": peak}
    result = json.loads(output.strip().splitlines()[-1])
    result.update(peak=peak, whole=whole, process_cpu=cpu)
    return result


def command(table: Path, t: int, out: Path, cache: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "clipengine", "coverage", str(table), "--t", str(t), "--out", str(out),
           "--json", "--quiet"]
    code, seconds, peak, output, cpu = run_child(cmd, env)
    if code != 0:
        return {"error": output[-2000:], "peak": peak}
    result = json.loads(output[output.index("{"):])
    return {"time": seconds, "cpu": cpu, "peak": peak, "coverage": result["coverage"],
            "missing": result["missing_total"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--t", default="2,3,4", help="comma-separated t values")
    parser.add_argument("--reference-procs", type=int, default=None, help="processes for the reference [cores]")
    parser.add_argument("--reference-sets", type=int, default=12_000,
                        help="at most this many sets timed for the reference (more: a sample, scaled)")
    parser.add_argument("--no-command", action="store_true", help="skip the whole-command runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    procs = args.reference_procs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if args.worker:
        folder = Path(args.data)
        if args.worker == "make":
            result = make_table(args.rows, args.features, args.seed, folder)
        elif args.worker == "kernel":
            result = worker_kernel(folder, args.level)
        else:
            result = worker_reference(folder, args.level, procs, args.reference_sets, args.seed)
        print(json.dumps(result))
        return
    levels = [int(x) for x in args.t.split(",")]
    print(f"coverage benchmark — {machine_line()}")
    compile_clipengine()  # as pip compiles an installed copy: no process below compiles clipengine's sources
    with tempfile.TemporaryDirectory(prefix="clipengine-bench-coverage-") as tmp:
        folder = Path(tmp)
        made = worker("make", "--data", tmp, "--rows", str(args.rows), "--features", str(args.features),
                      "--seed", str(args.seed))
        if "error" in made:
            print(f"generating the table failed:\n{made['error']}")
            return
        print(f"table: {made['rows']:,} rows × {made['features']} features ({made['values']} values, 2–6 each), "
              f"0/1 error column (mean {made['error_rate']:.3f}), {made['planted']} planted missing combinations; "
              f"reference: NumPy {np.__version__}, {procs} process(es)")
        for t in levels:
            sets = math.comb(args.features, t)
            print(f"\n== t = {t} ({sets:,} feature sets of {t})", flush=True)
            rows = []
            if not args.no_command:
                cache = folder / f"numba-cache-t{t}"
                cold = command(folder / "table.parquet", t, folder / f"out-cold-{t}", cache)
                warm = command(folder / "table.parquet", t, folder / f"out-warm-{t}", cache)
                rows += [("clipengine coverage, whole command, cold", cold),
                         ("clipengine coverage, whole command, warm", warm)]
            kernel = worker("kernel", "--data", tmp, "--level", str(t))
            rows.append((f"kernel only (count_combinations, t ≤ {t})", kernel))
            reference = worker("reference", "--data", tmp, "--level", str(t), "--reference-procs", str(procs),
                               "--reference-sets", str(args.reference_sets), "--seed", str(args.seed))
            rows.append((f"NumPy bincount reference (t = {t})", reference))
            for label, r in rows:
                if "error" in r:
                    print(f"   {label:<44} FAILED (peak {r['peak'] / 1e9:.2f} GB): {r['error'].strip()[-400:]}")
                    continue
                note = ""
                if label.startswith("NumPy"):
                    scaled = r["sampled"] < r["sets"]
                    note = (f"  ({'scaled from ' + format(r['sampled'], ',') + ' of ' if scaled else 'all '}"
                            f"{r['sets']:,} sets; {r['measured']:.1f} s measured; counts equal the kernel's: "
                            f"{r['agree']})")
                if "cpu" in r:
                    note = f"  (CPU {r['cpu']:.2f} s, user + system, all threads){note}"
                print(f"   {label:<44} {r['time']:9.2f} s   peak {r['peak'] / 1e9:6.2f} GB{note}")
            if "time" in reference and "time" in kernel:
                line = f"   reference / kernel: {reference['time'] / kernel['time']:.1f}×"
                if not args.no_command and "time" in rows[1][1]:
                    line += f"; reference / whole command warm: {reference['time'] / rows[1][1]['time']:.1f}×"
                print(line)
            if not args.no_command and "coverage" in rows[1][1]:
                cov = rows[1][1]["coverage"][-1]
                print(f"   t = {t}: {cov['covered']:,} of {cov['valid']:,} combinations covered; "
                      f"{rows[1][1]['missing']:,} missing (t ≤ {t})")


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    main()
