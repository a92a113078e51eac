"""SliceLine: what a user pays for `clipengine slices`, cold and warm, against PyPI sliceline and SystemDS.

    python bench/sliceline.py                          # Adult σ 32, L 3: all three engines, whole processes
    python bench/sliceline.py --case adult326          # Adult σ 326
    python bench/sliceline.py --case census            # USCensus-like 2.5M × 68, L 3, σ n/100 (clipengine only)
    python bench/sliceline.py --case census --rows 25000000 --warm 1

Every engine runs as the program a user would start, each in its own fresh process, on the
same data, in one run; the parent times the whole process and reads its peak memory (maxrss
from ``wait4``):

- **clipengine**: ``clipengine slices TABLE --error wrong --min-sup σ --json`` on the raw table (with
  ``--family lattice`` for Adult, so that it searches every row as the peers do; the census case runs the
  default split family a user gets: search on half the rows, tests and estimates on the other half)
  (CSV for Adult: the CLI reads it, types and bins the columns, searches, computes p- and
  q-values, prints). *Cold* is its first call ever (an empty Numba cache: every kernel is
  compiled), *warm* any later call (kernels loaded from the cache), median of ``--warm`` calls.
  Beside it, the search alone (``slice_line_local`` on the coded table in a warmed process,
  best of 5) and, for the census case, nothing else: the peers are not run at that size.
- **PyPI sliceline** (with its ``numba`` extra, installed): a Python process that reads the
  coded CSV with pandas and calls ``Slicefinder.fit`` (its one-hot encoding included), cold
  (empty Numba cache) and warm; beside it the ``fit`` call alone.
- **Apache SystemDS 3.4.0** (the jar of the PyPI wheel ``systemds``, Java 17): ``java … DMLScript``
  on a DML script that reads the coded CSV as a frame, recodes it (``transformencode``) and
  calls the builtin ``sliceLine``; the JVM start and the CSV read are in the whole process,
  and the ``sliceLine`` call alone is timed inside the script (twice: the JVM keeps no cache).

Peers get the table clipengine would search (Adult's numeric columns in clipengine's 10
quantile bins, written as level codes), so all engines search the same one-hot matrix; the
top-10 must agree (scores, sizes, error sums and the slices above the 10th score). Errors on
Adult: 0/1 misclassifications of a logistic regression on the one-hot features. The census
case is bench/_uscensus.py's table (skewed, correlated attributes; written as Parquet first,
not timed). Run on a quiet machine, under ``flock /tmp/clipengine-bench.lock``; the load
average before and after is printed next to the CPU model, its AMX/AVX512-BF16 flags, cores and date.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipengine.bench._install import compile_clipengine
from clipengine.bench._machine import machine_line

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "sliceline"
if not DATA.exists():
    DATA = Path("/work/shared/data/sliceline")

CASES = {
    # Adult: --family lattice, the whole table searched as the peers search it; census (no peer): the
    # command as a user types it, the default split family (search on half the rows, test on the rest)
    "adult": dict(kind="adult", min_sup=32, max_level=3, family="lattice"),
    "adult326": dict(kind="adult", min_sup=326, max_level=3, family="lattice"),
    "census": dict(kind="census", rows=2_500_000, max_level=3, family=None),
}
ALPHA = 0.95
K = 10
ERROR = "wrong"


# ---- machine ------------------------------------------------------------------------------------




# ---- data ---------------------------------------------------------------------------------------


def adult_frame():
    """Adult train (numbers as numbers) with ``wrong``: the 0/1 misclassifications of a plain
    logistic regression on clipengine's one-hot coding of the 14 features."""
    import polars as pl

    sys.path.insert(0, str(REPO))
    from clipengine.slices.coding import code_features

    frame = pl.read_csv(DATA / "adult_train.csv").with_columns(pl.col(pl.String).str.strip_chars())
    # numbers after ", " are read as text: make them numbers again
    frame = frame.with_columns(
        pl.col(c).cast(pl.Int64) for c in frame.columns
        if frame[c].dtype == pl.String and frame[c].cast(pl.Int64, strict=False).null_count() == 0
    )
    label = (frame["income"].str.contains(">50K")).to_numpy().astype(np.float64)
    features = [c for c in frame.columns if c != "income"]
    _, coded, _ = code_features(frame, features)
    local = np.column_stack([c.codes.astype(np.int64) for c in coded])
    domains = local.max(axis=0) + 1
    onehot = np.zeros((local.shape[0], int(domains.sum())), np.float32)
    offsets = np.concatenate(([0], np.cumsum(domains)[:-1]))
    onehot[np.arange(local.shape[0])[:, None], local + offsets] = 1.0
    from sklearn.linear_model import LogisticRegression

    predicted = LogisticRegression(max_iter=1000).fit(onehot, label).predict(onehot)
    return frame.drop("income").with_columns(pl.Series(ERROR, (predicted != label).astype(np.int64)))


def prepare(name: str, folder: Path, rows: int | None) -> dict:
    """(child) Write the case's tables into ``folder``: what each engine reads."""
    import polars as pl

    sys.path.insert(0, str(REPO))
    from clipengine.slices.coding import code_features

    spec = CASES[name]
    if spec["kind"] == "adult":
        frame = adult_frame()
        frame.write_csv(folder / "table.csv")
        features = [c for c in frame.columns if c != ERROR]
        used, coded_features, _ = code_features(frame, features)
        codes = np.column_stack([c.codes.astype(np.int64) for c in coded_features])
        labels = [c.labels for c in coded_features]
        # the peers' input: clipengine's levels written as codes "L<i>" (categorical for every engine)
        coded = pl.DataFrame({n: [f"L{v}" for v in codes[:, j]] for j, n in enumerate(used)})
        coded.with_columns(pl.Series(ERROR, frame[ERROR])).write_csv(folder / "coded.csv")
        np.savetxt(folder / "errors.csv", frame[ERROR].to_numpy(), fmt="%d")
        np.savez(folder / "codes.npz", local_t=np.ascontiguousarray(codes.T).astype(np.uint8),
                 domains=codes.max(axis=0) + 1, errors=frame[ERROR].to_numpy().astype(np.float64))
        (folder / "labels.json").write_text(json.dumps({"features": used, "labels": [[str(v) for v in lv]
                                                                                    for lv in labels]}))
        m, f, n_cols = frame.height, len(used), int(sum(len(lv) for lv in labels))
        min_sup, error_mean = spec["min_sup"], float(frame[ERROR].mean())
        table = folder / "table.csv"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import _uscensus

        m = rows or spec["rows"]
        table = _uscensus.write_census_parquet(folder / "table.parquet", m, error_column=ERROR)
        f, n_cols = len(_uscensus.NAMES), int(_uscensus.DOMAINS.sum())
        min_sup = math.ceil(m / 100)
        error_mean = float(pl.scan_parquet(table).select(pl.col(ERROR).mean()).collect().item())
    return dict(rows=m, features=f, columns=n_cols, min_sup=min_sup, max_level=spec["max_level"], table=str(table),
                error_mean=error_mean, kind=spec["kind"], family=spec["family"])


# ---- workers (run in child processes) ---------------------------------------------------------------


def worker_search(folder: Path, case: dict) -> dict:
    """clipengine's search alone, in a warmed process, best of 5 (Adult) or once (census)."""
    sys.path.insert(0, str(REPO))
    from clipengine.kernels.sliceline import slice_line_local

    if case["kind"] == "adult":
        data = np.load(folder / "codes.npz")
        local_t, domains, errors = data["local_t"], data["domains"], data["errors"]
        repeats = 5
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import _uscensus

        local_t, errors = _uscensus.census_codes(case["rows"])
        domains = _uscensus.DOMAINS
        repeats = 1
    kwargs = dict(k=K, alpha=ALPHA, min_sup=case["min_sup"], max_level=case["max_level"])
    slice_line_local(local_t[:, :2000], domains, errors[:2000], k=K, min_sup=5, max_level=2)  # load the kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = slice_line_local(local_t, domains, errors, **kwargs)
        times.append(time.perf_counter() - start)
    return dict(search=min(times), levels=[list(level) for level in out.levels], evaluated=int(out.evaluated_size.size))


def worker_pypi(folder: Path, case: dict) -> dict:
    """What a user of the PyPI package runs: read the table, ``Slicefinder.fit``."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # this file is named sliceline.py too
    import pandas as pd
    from sliceline import Slicefinder, is_numba_available

    frame = pd.read_csv(folder / "coded.csv")
    errors = frame.pop(ERROR).to_numpy(dtype=float)
    finder = Slicefinder(alpha=ALPHA, k=K, max_l=case["max_level"], min_sup=case["min_sup"])
    start = time.perf_counter()
    finder.fit(frame.to_numpy(), errors)
    fit = time.perf_counter() - start
    top = [[s["slice_score"], s["sum_slice_error"], s["max_slice_error"], s["slice_size"]]
           for s in finder.top_slices_statistics_]
    slices = [{int(j): str(v) for j, v in enumerate(row) if v is not None} for row in finder.top_slices_]
    return dict(search=fit, top=top, slices=slices, numba=bool(is_numba_available()))


DML = """
F = read($X, data_type="frame", format="csv", header=TRUE);
e = read($e, format="csv", header=FALSE);
[X, M] = transformencode(target=F, spec="{ids: true, recode: [" + $cols + "]}");
t0 = time();
[TK, TKC, D] = sliceLine(X=X, e=e, k=$k, maxL=$L, minSup=$minsup, alpha=$alpha, tpEval=TRUE, verbose=FALSE);
t1 = time();
write(TK, $TK, format="csv");
write(TKC, $TKC, format="csv");
write(M, $M, format="csv");
print("SLICELINE_SECONDS " + ((t1 - t0) / 1e9));
"""


def find_systemds_jar() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("systemds")  # located, not imported (its import prints warnings)
    if spec and spec.origin and (Path(spec.origin).parent / "SystemDS.jar").exists():
        return str(Path(spec.origin).parent / "SystemDS.jar")
    hits = glob.glob(f"{sys.prefix}/lib/python3*/site-packages/systemds/SystemDS.jar")
    return sorted(hits)[0] if hits else None


def run_systemds(jar: str, folder: Path, case: dict, heap: str) -> dict:
    script = folder / "sliceline.dml"
    script.write_text(DML)
    coded = folder / "coded.csv"
    # the coded table without the error column, which SystemDS reads apart
    import polars as pl

    frame = pl.read_csv(coded)
    features = frame.drop(ERROR)
    features.write_csv(folder / "X.csv")
    lib = str(Path(jar).parent / "lib" / "*")
    cols = ",".join(str(j + 1) for j in range(features.width))
    cmd = ["java", f"-Xmx{heap}", "--add-modules=jdk.incubator.vector", "-cp", f"{jar}:{lib}",
           "org.apache.sysds.api.DMLScript", "-exec", "singlenode", "-f", str(script), "-nvargs",
           f"X={folder / 'X.csv'}", f"e={folder / 'errors.csv'}", f"cols={cols}", f"k={K}", f"L={case['max_level']}",
           f"minsup={case['min_sup']}", f"alpha={ALPHA}", f"TK={folder / 'TK.csv'}", f"TKC={folder / 'TKC.csv'}",
           f"M={folder / 'M.csv'}"]
    whole, rss, code, output = _run_child(cmd)
    if code != 0:
        return dict(error=output[-2000:], maxrss=rss, whole=whole)
    seconds = float(next(line.split()[1] for line in output.splitlines() if line.startswith("SLICELINE_SECONDS")))
    tkc = np.loadtxt(folder / "TKC.csv", delimiter=",", ndmin=2)
    tk = np.loadtxt(folder / "TK.csv", delimiter=",", ndmin=2)
    # recode maps: "value·code" per column, after the two #Meta rows
    maps: dict[int, dict[int, str]] = {}
    for line in (folder / "M.csv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#Meta"):
            continue
        for j, cell in enumerate(line.split(",")):
            if "·" in cell:
                value, code = cell.rsplit("·", 1)
                maps.setdefault(j, {})[int(code)] = value
    slices = [{j: maps[j][int(v)] for j, v in enumerate(row) if v > 0} for row in tk]
    return dict(search=seconds, whole=whole, top=tkc.tolist(), slices=slices, maxrss=rss)


def _run_child(cmd: list[str], env: dict | None = None, stdout_only: bool = False):
    """Wall seconds, peak RSS (bytes), exit code and output of one process (stdout and stderr, or
    stdout alone with stderr appended when it fails)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors if stdout_only else subprocess.STDOUT,
                                text=True, env=env)
        output = proc.stdout.read()
        _, status, rusage = os.wait4(proc.pid, 0)
        whole = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if stdout_only and code != 0:
            errors.seek(0)
            output += errors.read()
    return whole, rusage.ru_maxrss * 1024, code, output


def _worker(kind: str, folder: Path, case: dict, env=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(folder), "--case-json", json.dumps(case)]
    whole, rss, code, output = _run_child(cmd, env)
    if code != 0:
        return dict(error=output[-2000:], maxrss=rss, whole=whole)
    result = json.loads(output.strip().splitlines()[-1])
    result.update(maxrss=rss, whole=whole)
    return result


def clipengine_command() -> list[str]:
    """The command a user types: the ``clipengine`` script next to this Python, else ``-m clipengine``."""
    script = Path(sys.executable).parent / "clipengine"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipengine"]


def run_cli(case: dict, env: dict, compat: bool = False) -> dict:
    cmd = [*clipengine_command(), "slices", case["table"], "--error", ERROR, "--min-sup", str(case["min_sup"]),
           "--max-level", str(case["max_level"]), "--k", str(K), "--alpha", str(ALPHA), "--json", "--quiet"]
    if case.get("family"):
        cmd += ["--family", case["family"]]
    if compat:
        cmd += ["--compat", "systemds"]
    whole, rss, code, output = _run_child(cmd, env, stdout_only=True)
    if code != 0:
        return dict(error=output[-2000:], maxrss=rss, whole=whole)
    records = json.loads(output)
    top = [[r["score"], r["error_sum"], r["max_error"], r["size"]] for r in records]
    return dict(whole=whole, maxrss=rss, top=top, predicates=[r["predicates"] for r in records])


def _as_codes(predicates: list[dict], labels: dict) -> list[dict]:
    """clipengine's ``{feature: label}`` predicates as the peers' ``{feature index: "L<code>"}``."""
    index = {name: j for j, name in enumerate(labels["features"])}
    out = []
    for p in predicates:
        out.append({index[name]: f"L{labels['labels'][index[name]].index(str(value))}" for name, value in p.items()})
    return out


def _agree(a: dict, b: dict, k: int = K) -> str:
    if "top" not in a or "top" not in b:
        return "n/a"
    ta, tb = np.array(a["top"], float)[:k], np.array(b["top"], float)[:k]
    if ta.shape != tb.shape:
        return f"no ({len(ta)} vs {len(tb)} slices)"
    same_stats = np.allclose(ta, tb, rtol=1e-9, atol=1e-9)
    kth = ta[-1, 0] if len(ta) else 0
    sa = {frozenset((int(f), v) for f, v in s.items()) for s, t in zip(a["slices"], ta) if t[0] > kth + 1e-12}
    sb = {frozenset((int(f), v) for f, v in s.items()) for s, t in zip(b["slices"], tb) if t[0] > kth + 1e-12}
    if same_stats and sa == sb:
        return "identical"
    if same_stats:
        return "statistics equal, slices differ"
    return "different"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="adult", help=f"one of {', '.join(CASES)} (comma-separated ok)")
    parser.add_argument("--rows", type=int, default=None, help="census rows [2,500,000]")
    parser.add_argument("--warm", type=int, default=3, help="warm clipengine calls (median) [3]")
    parser.add_argument("--no-pypi", action="store_true")
    parser.add_argument("--no-systemds", action="store_true")
    parser.add_argument("--systemds-jar", default=None)
    parser.add_argument("--systemds-heap", default="16g")
    parser.add_argument("--keep", default=None, help="keep the tables in this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--case-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker == "prepare":
            result = prepare(args.case, Path(args.data), args.rows)
        elif args.worker == "search":
            result = worker_search(Path(args.data), json.loads(args.case_json))
        else:
            result = worker_pypi(Path(args.data), json.loads(args.case_json))
        print(json.dumps(result))
        return
    names = args.case.split(",")
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    print(f"machine: {machine_line()}", flush=True)
    compile_clipengine()  # as pip compiles an installed copy: no process below compiles clipengine's sources
    for name in names:
        with tempfile.TemporaryDirectory(prefix="clipengine-bench-") as tmp:
            folder = Path(args.keep) if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            # built in a child: the parent stays small, so children's maxrss is their own
            cmd = [sys.executable, __file__, "--worker", "prepare", "--case", name, "--data", str(folder)]
            if args.rows:
                cmd += ["--rows", str(args.rows)]
            _, _, code, output = _run_child(cmd)
            if code != 0:
                print(f"== {name}: preparing the data failed:\n{output[-2000:]}")
                continue
            case = json.loads(output.strip().splitlines()[-1])
            print(f"\n== {name}: {case['rows']:,} rows × {case['features']} features ({case['columns']} one-hot "
                  f"columns), σ {case['min_sup']}, L {case['max_level']}, α {ALPHA}, k {K}, "
                  f"mean error {case['error_mean']:.4f}", flush=True)
            run_case(case, folder, args)
    print(f"\nmachine after: {machine_line()}")


def run_case(case: dict, folder: Path, args) -> None:
    cache = folder / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    rows = []
    cold = run_cli(case, env)  # first call ever: empty Numba cache
    warm = [run_cli(case, env) for _ in range(max(1, args.warm))]
    search = _worker("search", folder, case, env)
    ok = [r for r in warm if "error" not in r]
    ours = dict(ok[0]) if ok else dict(warm[0])
    if ok:
        ours["whole"] = statistics.median(r["whole"] for r in ok)
        ours["maxrss"] = max(r["maxrss"] for r in ok)
    rows.append(("clipengine slices", cold, ours, search))
    peers = {}
    if case["kind"] == "adult":
        labels = json.loads((folder / "labels.json").read_text())
        for result in (cold, ours):
            if "predicates" in result:
                result["slices"] = _as_codes(result["predicates"], labels)
        compat = run_cli(case, env, compat=True)
        if "predicates" in compat:
            compat["slices"] = _as_codes(compat["predicates"], labels)
        peers["clipengine --compat systemds"] = compat
        if not args.no_pypi:
            pypi_cache = folder / "pypi-numba-cache"
            pypi_env = {**os.environ, "NUMBA_CACHE_DIR": str(pypi_cache)}
            pypi_cold = _worker("pypi", folder, case, pypi_env)
            pypi_warm = _worker("pypi", folder, case, pypi_env)
            rows.append(("PyPI sliceline 0.3.0", pypi_cold, pypi_warm, pypi_warm))
            peers["PyPI sliceline"] = pypi_warm
        jar = None if args.no_systemds else (args.systemds_jar or find_systemds_jar())
        if jar:
            first = run_systemds(jar, folder, case, args.systemds_heap)
            second = run_systemds(jar, folder, case, args.systemds_heap)
            # the JVM keeps nothing between runs: its better run is its warm figure
            ok_runs = [r for r in (first, second) if "error" not in r]
            best = min(ok_runs, key=lambda r: r["whole"]) if ok_runs else second
            rows.append(("SystemDS 3.4.0", first, best, best))
            peers["SystemDS"] = best
        elif not args.no_systemds:
            print("   SystemDS: jar not found (pip install systemds==3.4.0)")
    print(f"   {'':<22} {'whole process: first / warm':>30} {'search alone':>14} {'peak memory':>12}")
    # ratios are against the peers' warm (best) processes
    for label, first, again, alone in rows:
        if "error" in again:
            print(f"   {label:<22} FAILED (peak {_gb(again['maxrss'])}): {again['error'].strip()[-400:]}")
            continue
        first_text = f"{first['whole']:.2f} s" if "error" not in first else "failed"
        alone_text = f"{alone['search']:.3f} s" if "search" in alone else "—"
        print(f"   {label:<22} {first_text + ' / ' + format(again['whole'], '.2f') + ' s':>30} {alone_text:>14} "
              f"{_gb(max(first.get('maxrss', 0), again['maxrss'])):>12}")
    if "levels" in search:
        print(f"   clipengine lattice: {search['evaluated']:,} candidates evaluated, levels {search['levels']}")
    base = ours.get("whole")
    for label, first, again, alone in rows[1:]:
        if base and "whole" in again and "error" not in again:
            ratio = f"{again['whole'] / base:.1f}× the warm clipengine process"
            if "search" in alone and "search" in search:
                ratio += f"; search alone {alone['search'] / search['search']:.0f}×"
            print(f"   {label}: {ratio}")
    for label, peer in peers.items():
        print(f"   top-{K} clipengine == {label}: {_agree(ours, peer)}")


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    main()
