"""SliceLine: top-K weak-slice discovery over one-hot coded data (Numba).

A slice is a conjunction of predicates ``feature = value`` on distinct features;
with ``m`` rows, mean error ``ē``, a slice S of size ``|S|`` and mean error ``ē_S``
scores ``α·(ē_S/ē − 1) − (1 − α)·(m/|S| − 1)`` (Sagadeeva & Boehm, SIGMOD 2021).

Data layout:

- ``local_t``: ``(f, m)`` uint8 (uint16 when a feature has more than 256 levels), C-order — for
  each feature its rows' level codes ``0 .. domains[j]-1`` (feature-major; :func:`slice_line_local`
  takes it as is, :func:`slice_line` makes it from global column ids).
- one-hot column ids are grouped by feature in feature order: feature ``j`` owns columns
  ``offsets[j] .. offsets[j+1]-1`` (``col_feature (n_cols,)`` int32 names each column's feature).
- ``errors``: ``(m,)`` float64, non-negative.
- internally a row-major copy ``(m, f)`` of the codes: a slice's rows are found by scanning one
  feature's codes (feature-major), and each such row is then read whole (row-major).

Enumeration is level-wise as SystemDS's ``sliceLine``: level 1 seeds every column with
size ≥ σ and error > 0; a level-L candidate joins two valid level-(L−1) slices sharing
L − 2 predicates (never two predicates on one feature) and is kept only when all its L
parents are valid; its size, error and max error are bounded by the elementwise minimum
over its parents, and the score upper bound is maximised over the sizes
``{σ, max(se/sm, σ), ss}``; candidates are pruned on size, bound ≤ 0 and bound ≤ the
current k-th score. Candidates are identified by sorted tuples of column ids (exact
integers, hashed exactly) and produced in lexicographic order (the order SystemDS's
pairing yields, so ties break the same way).

Evaluation: the candidates sharing their first L−2 columns (a prefix Q; empty at level 2) are
counted in one pass over Q's rows into a table ``(column L−2, column L−1)``: each row adds one
to every pair of its columns. With 0/1 errors all statistics are integers, so a feature's most
frequent value (within Q) is skipped and its entries derived by subtraction from Q's own column
counts (exact; on skewed data this removes most of the work); other errors are summed row by row
in row order, as a plain loop would.

Memory is bounded by design: candidates are generated and evaluated in blocks of at most
``BLOCK_CANDIDATES`` (plus one parent's extensions), and the per-thread tables are split so
that each stays under ``TABLE_BYTES``. The peak is (bytes; see :func:`memory_estimate`)::

    2·m·f·b + 9·m                    codes (feature- and row-major) and errors (b = 1 or 2)
    + T·S·n_cols·c                   per-thread tables (T threads, S ≤ n_cols slot columns, c = 16 or 28)
    + 8·n_cols²                      level-2 pair counts kept for level 3 (0/1 errors)
    + B·(4L + 112)                   one block of B ≤ BLOCK_CANDIDATES candidates
    + P·(4L + 104)·2                 the valid slices of a level, kept as the next level's parents
    + E·25                           the record of every evaluated candidate (E so far)

The first four terms do not depend on the size of the lattice; the last two do, and the
number of candidates of a level is counted exactly before anything of it is allocated, so a
``memory_limit`` is enforced before allocating: :class:`SliceLineMemoryError` says what the
level would need and what would fit.

``compat=True`` reproduces SystemDS's quirks: the bound uses the number of one-hot
columns as ``n`` and the pruning threshold is the lowest score in the current top-K
even when it holds fewer than k slices.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

BLOCK_CANDIDATES = 1 << 20  # candidates generated and evaluated at once
TABLE_BYTES = 64 << 20  # per-thread count tables of one evaluation task
PAIR_TABLE_BYTES = 512 << 20  # level-2 pair counts kept for level 3's subtractions, at most
BYTES_PER_EVALUATED = 25  # size int64 + error float64 + squared error float64 + level int8
BYTES_PER_CANDIDATE = 112  # + 4·level: a block's candidates, statistics, scores, top-K merge
BYTES_PER_PARENT = 104  # + 4·level: a valid slice kept as a parent (statistics, hash table, groups)
_BINARY_CELL = 16  # int32 count + int32 error count, and their sums over a feature's other values
_GENERAL_CELL = 28  # int32 count + float64 error, squared error, max error
_PAIR_CELL = 8  # the level-2 pair table: int32 count + int32 error count


class SliceLineOutput(NamedTuple):
    """What :func:`slice_line` returns.

    - ``top_slices``: ``(K, max_level)`` int32, the one-hot column ids of each top slice,
      sorted ascending, padded with -1; best first (K ≤ k).
    - ``top_stats``: ``(K, 4)`` float64 ``[score, error_sum, max_error, size]`` (SystemDS's TKC).
    - ``top_sq``: ``(K,)`` float64, sum of squared errors of each top slice.
    - ``top_index``: ``(K,)`` int64, index of each top slice in the ``evaluated_*`` arrays.
    - ``evaluated_size``: ``(C,)`` int64, ``evaluated_error``/``evaluated_sq``: ``(C,)`` float64,
      ``evaluated_level``: ``(C,)`` int8 — every candidate evaluated (level-1 columns with rows
      included), for multiple-testing correction.
    - ``levels``: per level ``(level, candidates_generated, valid_after_eval)``.
    """

    top_slices: np.ndarray
    top_stats: np.ndarray
    top_sq: np.ndarray
    top_index: np.ndarray
    evaluated_size: np.ndarray
    evaluated_error: np.ndarray
    evaluated_sq: np.ndarray
    evaluated_level: np.ndarray
    levels: list


class SliceLineMemoryError(MemoryError):
    """The search would need more than ``memory_limit`` bytes; raised before allocating.

    ``needed``/``limit``: bytes; ``level``: the level that would not fit (0: the data alone);
    ``candidates``: that level's candidate count; ``fits``: options that would fit, as
    ``{"max_level": L, "min_sup": σ, "features": f}`` (each present only when found).
    """

    def __init__(self, message: str, *, needed: int, limit: int, level: int, candidates: int, fits: dict):
        super().__init__(message)
        self.needed = needed
        self.limit = limit
        self.level = level
        self.candidates = candidates
        self.fits = fits


# ---- coding ---------------------------------------------------------------------------------------


def prepare_codes(local_codes: np.ndarray, domains: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global one-hot column ids from per-feature codes.

    ``local_codes``: ``(m, f)`` integer, values ``0 .. domains[j]-1`` in column j.
    ``domains``: ``(f,)`` number of levels per feature.
    Returns ``codes (m, f)`` int16 (int32 when there are ≥ 32767 columns), C-order;
    ``col_feature (n_cols,)`` int32; ``offsets (f+1,)`` int64.
    """
    domains = np.asarray(domains, dtype=np.int64)
    offsets = np.zeros(len(domains) + 1, dtype=np.int64)
    np.cumsum(domains, out=offsets[1:])
    n_cols = int(offsets[-1])
    dtype = np.int16 if n_cols < 32767 else np.int32
    local_codes = np.asarray(local_codes)
    codes = np.empty(local_codes.shape, dtype)
    for j in range(local_codes.shape[1]):  # column by column: no (m, f) int64 temporary
        codes[:, j] = local_codes[:, j].astype(np.int64) + offsets[j]
    col_feature = np.repeat(np.arange(len(domains), dtype=np.int32), domains)
    return codes, col_feature, offsets


def encode_recoded(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SystemDS's one-hot layout of a recoded matrix.

    ``X``: ``(m, f)`` integers ≥ 1 (codes ``1..d``); each feature gets ``max(X[:, j])`` columns
    (unused codes included, as ``table()`` makes them). Same returns as :func:`prepare_codes`.
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.size == 0 or np.any(X < 1) or np.any(X != np.round(X)):
        raise ValueError("X must be a non-empty 2-D matrix of integer codes >= 1")
    domains = X.max(axis=0).astype(np.int64)
    return prepare_codes(X.astype(np.int64) - 1, domains)


def local_code_dtype(domains: np.ndarray) -> np.dtype:
    """uint8 when every feature has at most 256 levels, else uint16 (at most 65,536)."""
    largest = int(np.max(domains)) if len(domains) else 1
    if largest > 65536:
        raise ValueError(f"a feature has {largest} levels; at most 65,536 are supported")
    return np.dtype(np.uint8 if largest <= 256 else np.uint16)


# ---- njit kernels ---------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _column_stats(local_t, f_offsets, errors, n_cols):
    """Size, error sum, squared-error sum and max error of every column (features in parallel,
    each column's sums in row order)."""
    nf, m = local_t.shape
    ss = np.zeros(n_cols, np.int64)
    se = np.zeros(n_cols, np.float64)
    sq = np.zeros(n_cols, np.float64)
    sm = np.zeros(n_cols, np.float64)
    for j in prange(nf):
        base = f_offsets[j]
        column = local_t[j]
        for r in range(m):
            e = errors[r]
            c = base + column[r]
            ss[c] += 1
            se[c] += e
            sq[c] += e * e
            if e > sm[c]:
                sm[c] = e
    return ss, se, sq, sm


@njit(cache=True, parallel=True)
def _transpose(local_t, out):
    """``out (m, f)`` ← ``local_t (f, m)``, in row blocks that stay in cache."""
    nf, m = local_t.shape
    n_blocks = (m + 4095) // 4096
    for b in prange(n_blocks):
        r0 = b * 4096
        r1 = min(m, r0 + 4096)
        for j in range(nf):
            column = local_t[j]
            for r in range(r0, r1):
                out[r, j] = column[r]


@njit(cache=True, parallel=True)
def _global_to_local(codes, f_offsets, out):
    """``out (f, m)`` local codes ← ``codes (m, f)`` global column ids."""
    m, nf = codes.shape
    n_blocks = (m + 4095) // 4096
    for b in prange(n_blocks):
        r0 = b * 4096
        r1 = min(m, r0 + 4096)
        for j in range(nf):
            base = f_offsets[j]
            target = out[j]
            for r in range(r0, r1):
                target[r] = codes[r, j] - base


@njit(cache=True, inline="always")
def _score(ss, se, eavg, alpha, n):
    return alpha * ((se / ss) / eavg - 1.0) - (1.0 - alpha) * (n / ss - 1.0)


@njit(cache=True)
def _score_ub(ss, se, sm, eavg, min_sup, alpha, n):
    best = -np.inf
    for p in range(3):
        if p == 0:
            s = float(min_sup)
        elif p == 1:
            s = max(se / sm, float(min_sup))
        else:
            s = float(ss)
        v = alpha * ((min(s * sm, se) / s) / eavg - 1.0) - (1.0 - alpha) * (n / s - 1.0)
        if v > best:  # NaN never wins (SystemDS maps NaN to -Inf)
            best = v
    return best


@njit(cache=True, inline="always")
def _mix(h, x):
    h = (h ^ (x + 0x9E3779B9)) * 0x100000001B3
    return h ^ (h >> 31)


@njit(cache=True)
def _hash_row(S, i):
    h = np.int64(0x3C6EF372)
    for t in range(S.shape[1]):
        h = _mix(h, np.int64(S[i, t]))
    return h


@njit(cache=True)
def _build_table(S):
    n = S.shape[0]
    size = 1
    while size < 2 * n + 2:
        size *= 2
    table = np.full(size, -1, np.int64)
    mask = size - 1
    for i in range(n):
        slot = _hash_row(S, i) & mask
        while table[slot] != -1:
            slot = (slot + 1) & mask
        table[slot] = i
    return table


@njit(cache=True)
def _lookup_without(table, S, cand, skip):
    """Index in S of ``cand`` with element ``skip`` removed, or -1."""
    width = cand.shape[0] - 1
    h = np.int64(0x3C6EF372)
    for t in range(cand.shape[0]):
        if t != skip:
            h = _mix(h, np.int64(cand[t]))
    mask = table.shape[0] - 1
    slot = h & mask
    while True:
        i = table[slot]
        if i == -1:
            return -1
        same = True
        u = 0
        for t in range(cand.shape[0]):
            if t == skip:
                continue
            if S[i, u] != cand[t]:
                same = False
                break
            u += 1
        if same and u == width:
            return i
        slot = (slot + 1) & mask


@njit(cache=True, parallel=True)
def _generate(S, s_ss, s_se, s_sm, group_end, col_feature, table, min_sup, alpha, eavg, bound_n,
              threshold, tol, a0, a1, counts, offsets, out, fill):
    """Pair valid (L-1)-slices ``S`` (sorted lexicographically) sharing their first L-2 columns.

    For the left parents ``a0 .. a1-1``: with ``fill=False`` counts survivors per left parent
    into ``counts``; with ``fill=True`` writes them at ``offsets[a] - offsets[a0]`` into
    ``out (C, L)`` (lexicographic order).
    """
    n, width = S.shape
    level = width + 1
    base = offsets[a0]
    for a in prange(a0, a1):
        cand = np.empty(level, np.int32)
        for t in range(width):
            cand[t] = S[a, t]
        last_a = S[a, width - 1]
        pos = 0
        if fill:
            pos = offsets[a] - base
        kept = 0
        for b in range(a + 1, group_end[a]):
            last_b = S[b, width - 1]
            if col_feature[last_a] == col_feature[last_b]:
                continue
            cand[width] = last_b
            ss = min(s_ss[a], s_ss[b])
            se = min(s_se[a], s_se[b])
            sm = min(s_sm[a], s_sm[b])
            ok = ss >= min_sup
            # remaining parents: drop one of the shared prefix columns
            t = 0
            while ok and t < width - 1:
                p = _lookup_without(table, S, cand, t)
                if p < 0:
                    ok = False
                else:
                    ss = min(ss, s_ss[p])
                    se = min(se, s_se[p])
                    sm = min(sm, s_sm[p])
                    ok = ss >= min_sup
                t += 1
            if not ok:
                continue
            ub = _score_ub(ss, se, sm, eavg, min_sup, alpha, bound_n)
            if not (ub > threshold - tol and ub > -tol):
                continue
            if fill:
                for u in range(level):
                    out[pos + kept, u] = cand[u]
            kept += 1
        if not fill:
            counts[a] = kept


@njit(cache=True)
def _plan_tasks(C, col_feature, f_offsets, max_slot_cols, key_width, by_feature):
    """Split lexicographically sorted candidates ``C (n, L)`` into evaluation tasks.

    A group is a run of candidates sharing their first ``key_width`` columns (the prefix Q) or,
    with ``by_feature``, the feature of their first column. A group's column-(L-2) ("slot")
    features are cut into runs of whole features of at most ``max_slot_cols`` columns (one
    feature alone may be wider); a task is (group, run). Returns ``start``, ``end`` (candidate
    range of the group) and ``lo``, ``hi`` (slot column range) per task.
    """
    n, level = C.shape
    nf = f_offsets.shape[0] - 1
    present = np.zeros(nf, np.bool_)
    starts = np.empty(n, np.int64)
    ends = np.empty(n, np.int64)
    los = np.empty(n, np.int64)
    his = np.empty(n, np.int64)
    t = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n:
            if by_feature:
                same = col_feature[C[j, 0]] == col_feature[C[i, 0]]
            else:
                same = True
                for u in range(key_width):
                    if C[j, u] != C[i, u]:
                        same = False
                        break
            if not same:
                break
            j += 1
        fa = nf
        fb = -1
        for u in range(i, j):
            f = col_feature[C[u, level - 2]]
            present[f] = True
            fa = min(fa, f)
            fb = max(fb, f)
        f = fa
        while f <= fb:
            if not present[f]:
                f += 1
                continue
            run_start = f
            run_end = f  # last feature of the run
            g = f + 1
            while g <= fb and f_offsets[g + 1] - f_offsets[run_start] <= max_slot_cols:
                if present[g]:
                    run_end = g
                g += 1
            if t == starts.shape[0]:  # more tasks than candidates: grow
                starts = np.concatenate((starts, np.empty(n, np.int64)))
                ends = np.concatenate((ends, np.empty(n, np.int64)))
                los = np.concatenate((los, np.empty(n, np.int64)))
                his = np.concatenate((his, np.empty(n, np.int64)))
            starts[t] = i
            ends[t] = j
            los[t] = f_offsets[run_start]
            his[t] = f_offsets[run_end + 1]
            t += 1
            f = run_end + 1
        for f in range(fa, fb + 1):
            present[f] = False
        i = j
    return starts[:t].copy(), ends[:t].copy(), los[:t].copy(), his[:t].copy()


@njit(cache=True)
def _task_features(C, i0, i1, slot_lo, slot_hi, col_feature, nf, flags, features):
    """Flag the features a task reads (bit 1: slot feature, column L-2 in ``[slot_lo, slot_hi)``;
    bit 2: column feature, column L-1 of such a candidate) and list them ascending in ``features``;
    returns the count."""
    level = C.shape[1]
    f_first = col_feature[slot_lo]
    for f in range(nf):
        flags[f] = 0
    for i in range(i0, i1):
        c = C[i, level - 2]
        if slot_lo <= c < slot_hi:
            flags[col_feature[c]] |= 1
            flags[col_feature[C[i, level - 1]]] |= 2
    n = 0
    for f in range(f_first, nf):
        if flags[f] != 0:
            features[n] = f
            n += 1
    return n


@njit(cache=True)
def _fill_binary(prefix, local_t, local_rm, f_offsets, err, H, HE, complement, n_feat, features, flags,
                 slot_lo, slot_hi, col_feature, T, E):
    """``T``/``E (slot_hi - slot_lo, n_cols)`` ← size and error count of prefix ∧ slot column ∧ column,
    for the listed ``features`` (0/1 errors: exact integers). Rows of the prefix (column ids;
    empty: every row) are found by scanning the first one's feature, then read whole.

    With ``complement``, each feature's most frequent value within the prefix (by ``H``, the
    prefix's own column sizes; ``HE`` its error counts) is not counted: its entries are derived
    by subtraction, for the column features (``flags`` bit 2).
    """
    nf, m = local_t.shape
    width = prefix.shape[0]
    f_last = col_feature[slot_hi - 1]
    T[:, :] = 0
    E[:, :] = 0
    feature_of = np.empty(n_feat, np.int64)
    feature_offset = np.empty(n_feat, np.int64)
    feature_dominant = np.empty(n_feat, np.int64)
    feature_slot = np.empty(n_feat, np.int64)
    n_slot_features = 0
    single_slot = -1  # the only slot feature: rows at its skipped value add nothing
    for t in range(n_feat):
        f = features[t]
        feature_of[t] = f
        feature_offset[t] = f_offsets[f]
        dominant = -1
        if complement:
            dominant = f_offsets[f]
            for c in range(f_offsets[f] + 1, f_offsets[f + 1]):
                if H[c] > H[dominant]:
                    dominant = c
        feature_dominant[t] = dominant
        slot = (flags[f] & 1) != 0 and f <= f_last
        feature_slot[t] = 1 if slot else 0
        if slot:
            n_slot_features += 1
            single_slot = t
    if n_slot_features != 1 or not complement:
        single_slot = -1
    entries = np.empty(n_feat, np.uint32)  # unsigned: no negative-index wraparound in the inner loop
    entry_slot = np.empty(n_feat, np.int64)
    if width > 0:
        f0 = col_feature[prefix[0]]
        x0 = prefix[0] - f_offsets[f0]
        scan = local_t[f0]
    else:
        x0 = 0
        scan = local_t[0]
    if single_slot >= 0:
        slot_column = local_t[feature_of[single_slot]]
        slot_skip = feature_dominant[single_slot] - feature_offset[single_slot]
    else:
        slot_column = local_t[0]
        slot_skip = -1
    for r in range(m):
        if width > 0:
            if scan[r] != x0:
                continue
            inside = True
            for u in range(1, width):
                c = prefix[u]
                f = col_feature[c]
                if f_offsets[f] + local_rm[r, f] != c:
                    inside = False
                    break
            if not inside:
                continue
        if slot_column[r] == slot_skip:
            continue
        row = local_rm[r]
        k = 0
        n_slot_entries = 0
        for t in range(n_feat):  # the row's columns, the skipped (most frequent) values left out
            g = feature_offset[t] + row[feature_of[t]]
            keep = g != feature_dominant[t]
            entries[k] = g
            entry_slot[k] = feature_slot[t]
            n_slot_entries += keep & feature_slot[t]
            k += keep
        if n_slot_entries == 0:
            continue
        if err[r] != 0:
            for j1 in range(k):
                if entry_slot[j1]:
                    s = entries[j1] - slot_lo
                    for j2 in range(j1 + 1, k):
                        x = entries[j2]
                        T[s, x] += 1
                        E[s, x] += 1
        else:
            for j1 in range(k):
                if entry_slot[j1]:
                    s = entries[j1] - slot_lo
                    for j2 in range(j1 + 1, k):
                        T[s, entries[j2]] += 1
    if not complement:
        return
    for t1 in range(n_feat):
        if feature_slot[t1] == 0:
            continue
        f1 = feature_of[t1]
        d1 = feature_dominant[t1]
        # a counted slot value c: its entry at a feature's skipped value = |prefix ∧ c| − the others
        for c in range(f_offsets[f1], f_offsets[f1 + 1]):
            if c == d1:
                continue
            s = c - slot_lo
            for t2 in range(t1 + 1, n_feat):
                f2 = feature_of[t2]
                if (flags[f2] & 2) == 0:
                    continue
                d2 = feature_dominant[t2]
                rest = 0
                rest_err = 0
                for x in range(f_offsets[f2], f_offsets[f2 + 1]):
                    if x != d2:
                        rest += T[s, x]
                        rest_err += E[s, x]
                T[s, d2] = H[c] - rest
                E[s, d2] = HE[c] - rest_err
        # the skipped slot value: |prefix ∧ x| − the other values of its feature
        s = d1 - slot_lo
        for t2 in range(t1 + 1, n_feat):
            f2 = feature_of[t2]
            if (flags[f2] & 2) == 0:
                continue
            for x in range(f_offsets[f2], f_offsets[f2 + 1]):
                rest = 0
                rest_err = 0
                for v in range(f_offsets[f1], f_offsets[f1 + 1]):
                    if v != d1:
                        rest += T[v - slot_lo, x]
                        rest_err += E[v - slot_lo, x]
                T[s, x] = H[x] - rest
                E[s, x] = HE[x] - rest_err


@njit(cache=True)
def _read_binary(C, i0, i1, first, slot_lo, slot_hi, T, E, out_ss, out_se, out_sq, out_sm):
    """Statistics of the candidates in ``i0..i1-1`` whose slot column is in ``[slot_lo, slot_hi)``
    (and whose first column is ``first``, unless -1) from the tables."""
    level = C.shape[1]
    for i in range(i0, i1):
        c = C[i, level - 2]
        if c < slot_lo or c >= slot_hi or (first >= 0 and C[i, 0] != first):
            continue
        x = C[i, level - 1]
        out_ss[i] = T[c - slot_lo, x]
        e = float(E[c - slot_lo, x])
        out_se[i] = e
        out_sq[i] = e
        out_sm[i] = 1.0 if e > 0 else 0.0


@njit(cache=True)
def _binary_task(C, i0, i1, slot_lo, slot_hi, by_feature, local_t, local_rm, f_offsets, col_feature, err,
                 column_counts, column_errors, pair_cnt, pair_err, store_pairs, out_ss, out_se, out_sq, out_sm):
    """One task with 0/1 errors (see :func:`_plan_tasks`).

    Level 2 (empty prefix): rows are every row, ``H`` the column sizes; the task's rows of the pair
    table are stored when ``store_pairs``. ``by_feature`` (level 3 with the pair table): the
    candidates of one first feature f0; each first column's table is counted with the pair table's
    row as ``H``, and the most frequent value of f0, when that is cheaper, is not counted at all:
    its table is the pair table minus the others'. Otherwise (no pair table or level ≥ 4) each
    prefix is counted plainly.
    """
    nf, m = local_t.shape
    n_cols = col_feature.shape[0]
    level = C.shape[1]
    width = level - 2
    n_slots = slot_hi - slot_lo
    flags = np.zeros(nf, np.int64)
    features = np.empty(nf, np.int64)
    n_feat = _task_features(C, i0, i1, slot_lo, slot_hi, col_feature, nf, flags, features)
    T = np.empty((n_slots, n_cols), np.int32)
    E = np.empty((n_slots, n_cols), np.int32)
    if width == 0:
        _fill_binary(np.zeros(0, np.int64), local_t, local_rm, f_offsets, err, column_counts, column_errors, True,
                     n_feat, features, flags, slot_lo, slot_hi, col_feature, T, E)
        _read_binary(C, i0, i1, -1, slot_lo, slot_hi, T, E, out_ss, out_se, out_sq, out_sm)
        if store_pairs:
            for t in range(n_feat):
                f2 = features[t]
                if (flags[f2] & 2) == 0:
                    continue
                for s in range(n_slots):
                    for x in range(f_offsets[f2], f_offsets[f2 + 1]):
                        pair_cnt[slot_lo + s, x] = T[s, x]
                        pair_err[slot_lo + s, x] = E[s, x]
        return
    if not by_feature:
        prefix = C[i0, :width].astype(np.int64)
        _fill_binary(prefix, local_t, local_rm, f_offsets, err, column_counts, column_errors, False, n_feat, features,
                     flags, slot_lo, slot_hi, col_feature, T, E)
        _read_binary(C, i0, i1, -1, slot_lo, slot_hi, T, E, out_ss, out_se, out_sq, out_sm)
        return
    f0 = col_feature[C[i0, 0]]
    dominant = f_offsets[f0]
    for c0 in range(f_offsets[f0] + 1, f_offsets[f0 + 1]):
        if column_counts[c0] > column_counts[dominant]:
            dominant = c0
    has = np.zeros(f_offsets[f0 + 1] - f_offsets[f0], np.bool_)
    for i in range(i0, i1):
        c = C[i, level - 2]
        if slot_lo <= c < slot_hi:
            has[C[i, 0] - f_offsets[f0]] = True
    direct = 0
    for c0 in range(f_offsets[f0], f_offsets[f0 + 1]):
        if has[c0 - f_offsets[f0]]:
            direct += column_counts[c0]
    subtract = has[dominant - f_offsets[f0]] and m - column_counts[dominant] < direct
    if subtract:
        A = np.zeros((n_slots, n_cols), np.int32)
        AE = np.zeros((n_slots, n_cols), np.int32)
    prefix = np.empty(1, np.int64)
    for c0 in range(f_offsets[f0], f_offsets[f0 + 1]):
        if c0 == dominant and subtract:
            continue
        if not has[c0 - f_offsets[f0]] and not (subtract and column_counts[c0] > 0):
            continue
        prefix[0] = c0
        _fill_binary(prefix, local_t, local_rm, f_offsets, err, pair_cnt[c0], pair_err[c0], True, n_feat, features,
                     flags, slot_lo, slot_hi, col_feature, T, E)
        _read_binary(C, i0, i1, c0, slot_lo, slot_hi, T, E, out_ss, out_se, out_sq, out_sm)
        if subtract:
            A += T
            AE += E
    if subtract:
        # every row has one value of f0: the skipped value's table is the pair table minus the others'
        for s in range(n_slots):
            for x in range(n_cols):
                T[s, x] = pair_cnt[slot_lo + s, x] - A[s, x]
                E[s, x] = pair_err[slot_lo + s, x] - AE[s, x]
        _read_binary(C, i0, i1, dominant, slot_lo, slot_hi, T, E, out_ss, out_se, out_sq, out_sm)


@njit(cache=True)
def _general_task(C, i0, i1, slot_lo, slot_hi, local_t, local_rm, f_offsets, col_feature, errors,
                  out_ss, out_se, out_sq, out_sm):
    """One task with any non-negative errors: size, error sum, squared-error sum and max error of the
    task's candidates, each sum accumulated over the slice's rows in row order."""
    nf, m = local_t.shape
    n_cols = col_feature.shape[0]
    level = C.shape[1]
    width = level - 2
    n_slots = slot_hi - slot_lo
    flags = np.zeros(nf, np.int64)
    features = np.empty(nf, np.int64)
    n_feat = _task_features(C, i0, i1, slot_lo, slot_hi, col_feature, nf, flags, features)
    f_last = col_feature[slot_hi - 1]
    feature_of = features[:n_feat].copy()
    feature_offset = np.empty(n_feat, np.int64)
    feature_slot = np.empty(n_feat, np.int64)
    for t in range(n_feat):
        f = feature_of[t]
        feature_offset[t] = f_offsets[f]
        feature_slot[t] = 1 if (flags[f] & 1) != 0 and f <= f_last else 0
    T = np.zeros((n_slots, n_cols), np.int32)
    S = np.zeros((n_slots, n_cols), np.float64)
    Q = np.zeros((n_slots, n_cols), np.float64)
    M = np.zeros((n_slots, n_cols), np.float64)
    entries = np.empty(n_feat, np.uint32)
    if width > 0:
        q0 = C[i0, 0]
        f0 = col_feature[q0]
        x0 = q0 - f_offsets[f0]
        scan = local_t[f0]
    else:
        x0 = 0
        scan = local_t[0]
    for r in range(m):
        if width > 0:
            if scan[r] != x0:
                continue
            inside = True
            for u in range(1, width):
                c = C[i0, u]
                f = col_feature[c]
                if f_offsets[f] + local_rm[r, f] != c:
                    inside = False
                    break
            if not inside:
                continue
        row = local_rm[r]
        for t in range(n_feat):
            entries[t] = feature_offset[t] + row[feature_of[t]]
        e = errors[r]
        e2 = e * e
        for j1 in range(n_feat):
            if feature_slot[j1] != 0:
                s = entries[j1] - slot_lo
                for j2 in range(j1 + 1, n_feat):
                    x = entries[j2]
                    T[s, x] += 1
                    S[s, x] += e
                    Q[s, x] += e2
                    if e > M[s, x]:
                        M[s, x] = e
    for i in range(i0, i1):
        c = C[i, level - 2]
        if c < slot_lo or c >= slot_hi:
            continue
        x = C[i, level - 1]
        out_ss[i] = T[c - slot_lo, x]
        out_se[i] = S[c - slot_lo, x]
        out_sq[i] = Q[c - slot_lo, x]
        out_sm[i] = M[c - slot_lo, x]


@njit(cache=True, parallel=True)
def _evaluate_binary(C, starts, ends, lo, hi, by_feature, local_t, local_rm, f_offsets, col_feature, err,
                     column_counts, column_errors, pair_cnt, pair_err, store_pairs, out_ss, out_se, out_sq, out_sm):
    """Every task of a block in parallel (0/1 errors); see :func:`_binary_task`."""
    for t in prange(lo.shape[0]):
        _binary_task(C, starts[t], ends[t], lo[t], hi[t], by_feature, local_t, local_rm, f_offsets, col_feature, err,
                     column_counts, column_errors, pair_cnt, pair_err, store_pairs, out_ss, out_se, out_sq, out_sm)


@njit(cache=True, parallel=True)
def _evaluate_general(C, starts, ends, lo, hi, local_t, local_rm, f_offsets, col_feature, errors,
                      out_ss, out_se, out_sq, out_sm):
    """Every task of a block in parallel (any errors)."""
    for t in prange(lo.shape[0]):
        _general_task(C, starts[t], ends[t], lo[t], hi[t], local_t, local_rm, f_offsets, col_feature, errors,
                      out_ss, out_se, out_sq, out_sm)


@njit(cache=True)
def _scores(ss, se, eavg, alpha, n):
    out = np.empty(ss.shape[0], np.float64)
    for i in range(ss.shape[0]):
        if ss[i] == 0:
            out[i] = -np.inf
        else:
            out[i] = _score(float(ss[i]), se[i], eavg, alpha, n)
    return out


@njit(cache=True)
def _parent_bounds(ss, se, sm, eavg, min_sup, alpha, n):
    out = np.empty(ss.shape[0], np.float64)
    for i in range(ss.shape[0]):
        out[i] = _score_ub(float(ss[i]), se[i], sm[i], eavg, min_sup, alpha, n)
    return out


@njit(cache=True)
def _slice_mask(codes, col_feature, columns):
    m = codes.shape[0]
    mask = np.ones(m, np.bool_)
    for r in range(m):
        for t in range(columns.shape[0]):
            c = columns[t]
            if c >= 0 and codes[r, col_feature[c]] != c:
                mask[r] = False
                break
    return mask


# ---- orchestration ----------------------------------------------------------------------------------


def slice_mask(codes: np.ndarray, col_feature: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``(m,)`` bool: the rows of the slice whose column ids are ``columns`` (-1 entries ignored);
    ``codes (m, f)`` global column ids."""
    return _slice_mask(codes, col_feature, np.asarray(columns, dtype=np.int64))


def slice_mask_local(local_t: np.ndarray, offsets: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``(m,)`` bool: the rows of a slice (column ids ``columns``, -1 ignored) in feature-major
    local codes ``local_t (f, m)`` with feature column offsets ``offsets (f+1,)``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    mask = np.ones(local_t.shape[1], dtype=bool)
    for c in np.asarray(columns, dtype=np.int64):
        if c < 0:
            continue
        f = int(np.searchsorted(offsets, c, side="right") - 1)
        mask &= local_t[f] == c - offsets[f]
    return mask


def _group_bounds(keys: np.ndarray) -> np.ndarray:
    """Start offsets (+ end) of runs of identical rows in a lexicographically sorted ``keys (n, w)``."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros(1, np.int64)
    if keys.shape[1] == 0:
        return np.array([0, n], np.int64)
    change = np.any(keys[1:] != keys[:-1], axis=1)
    starts = np.flatnonzero(np.concatenate(([True], change)))
    return np.concatenate((starts, [n])).astype(np.int64)


def _update_top_k(top, cand_cols, stats, sq, index, k, min_sup):
    """Stable descending merge of the current top-K with new valid candidates, cut at k."""
    valid = (stats[:, 0] > 0) & (stats[:, 3] >= min_sup)
    if not valid.any():
        return top
    sel = np.flatnonzero(valid)
    t_cols, t_stats, t_sq, t_index = top
    # only the k best new ones can enter; keep their original order among ties
    if sel.size > k:
        order = np.argsort(-stats[sel, 0], kind="stable")[:k]
        sel = np.sort(sel[order])
    width = t_cols.shape[1]
    new_cols = np.full((sel.size, width), -1, np.int32)
    new_cols[:, : cand_cols.shape[1]] = cand_cols[sel]
    all_cols = np.concatenate((t_cols, new_cols))
    all_stats = np.concatenate((t_stats, stats[sel]))
    all_sq = np.concatenate((t_sq, sq[sel]))
    all_index = np.concatenate((t_index, index[sel]))
    order = np.argsort(-all_stats[:, 0], kind="stable")[:k]
    return all_cols[order], all_stats[order], all_sq[order], all_index[order]


def _threshold(top, k, compat):
    scores = top[1][:, 0]
    if compat:
        return scores[-1] if scores.size else -np.inf
    return scores[k - 1] if scores.size >= k else -np.inf


def _slot_columns(n_cols: int, largest_domain: int, binary: bool) -> int:
    """Slot columns per task table so that one table stays under ``TABLE_BYTES``."""
    cell = _BINARY_CELL if binary else _GENERAL_CELL
    return int(max(largest_domain, min(n_cols, TABLE_BYTES // max(1, n_cols * cell))))


def _pair_table_fits(n_cols: int) -> bool:
    return n_cols * n_cols * _PAIR_CELL <= PAIR_TABLE_BYTES


def memory_estimate(rows: int, features: int, n_cols: int, *, threads: int, binary: bool = True,
                    largest_domain: int = 256, max_level: int = 3, level: int = 1, block: int = 0,
                    parents: int = 0, evaluated: int = 0, code_bytes: int = 1,
                    extra_per_evaluated: int = 0) -> int:
    """Peak bytes of :func:`slice_line_local` (the formula of the module docstring).

    ``block``: candidates in the largest block of ``level``; ``parents``: valid slices kept at a
    level (the next level's parents); ``evaluated``: candidates evaluated so far (all levels);
    ``extra_per_evaluated``: what the caller spends per evaluated candidate afterwards (p-values).
    """
    data = 2 * rows * features * code_bytes + 9 * rows + 64 * n_cols
    cell = _BINARY_CELL if binary else _GENERAL_CELL
    tables = threads * _slot_columns(n_cols, largest_domain, binary) * n_cols * cell
    pairs = n_cols * n_cols * _PAIR_CELL if binary and max_level >= 3 and _pair_table_fits(n_cols) else 0
    lattice = (block * (BYTES_PER_CANDIDATE + 4 * level) + 2 * parents * (BYTES_PER_PARENT + 4 * level)
               + evaluated * (BYTES_PER_EVALUATED + extra_per_evaluated))
    return int(data + tables + pairs + lattice)


def slice_line(
    codes: np.ndarray,
    errors: np.ndarray,
    col_feature: np.ndarray,
    *,
    k: int = 10,
    alpha: float = 0.95,
    min_sup: int = 32,
    max_level: int = 3,
    compat: bool = False,
    allowed: np.ndarray | None = None,
    threads: int | None = None,
    on_level=None,
    memory_limit: int | None = None,
    extra_per_evaluated: int = 0,
) -> SliceLineOutput:
    """Top-K slices by SliceLine score.

    ``codes``: ``(m, f)`` int16/int32 global column ids (see :func:`prepare_codes`), converted
    once to feature-major local codes (:func:`slice_line_local` takes those directly and saves
    the copy); ``errors``: ``(m,)`` non-negative float64; ``col_feature``: ``(n_cols,)`` int32.
    Other arguments as :func:`slice_line_local`.
    """
    codes = np.asarray(codes)
    col_feature = np.ascontiguousarray(col_feature, dtype=np.int32)
    domains = np.bincount(col_feature, minlength=codes.shape[1] if codes.ndim == 2 else 0).astype(np.int64)
    offsets = np.zeros(domains.size + 1, np.int64)
    np.cumsum(domains, out=offsets[1:])
    local_t = np.empty((codes.shape[1], codes.shape[0]), local_code_dtype(domains))
    if codes.dtype not in (np.int16, np.int32):
        codes = codes.astype(np.int32)
    _global_to_local(np.ascontiguousarray(codes), offsets, local_t)
    return slice_line_local(local_t, domains, errors, k=k, alpha=alpha, min_sup=min_sup, max_level=max_level,
                            compat=compat, allowed=allowed, threads=threads, on_level=on_level,
                            memory_limit=memory_limit, extra_per_evaluated=extra_per_evaluated)


def slice_line_local(
    local_t: np.ndarray,
    domains: np.ndarray,
    errors: np.ndarray,
    *,
    k: int = 10,
    alpha: float = 0.95,
    min_sup: int = 32,
    max_level: int = 3,
    compat: bool = False,
    allowed: np.ndarray | None = None,
    threads: int | None = None,
    on_level=None,
    memory_limit: int | None = None,
    extra_per_evaluated: int = 0,
) -> SliceLineOutput:
    """Top-K slices by SliceLine score, from feature-major local codes.

    ``local_t``: ``(f, m)`` uint8/uint16, C-order, codes ``0 .. domains[j]-1`` (see
    :func:`local_code_dtype`); ``domains``: ``(f,)`` levels per feature (column ids follow);
    ``errors``: ``(m,)`` non-negative float64; ``allowed``: optional ``(n_cols,)`` bool, columns
    that may appear in a slice (others are never seeded, e.g. dropped null levels).
    ``min_sup`` ≥ 1 rows. ``compat`` reproduces SystemDS's output (bound with n = n_cols;
    threshold = lowest current top-K score). ``on_level(level, candidates)``: optional callback
    after each level is evaluated. ``memory_limit``: bytes; a level whose estimate
    (:func:`memory_estimate`) exceeds it raises :class:`SliceLineMemoryError` before it is
    allocated. ``extra_per_evaluated``: bytes the caller needs per evaluated candidate afterwards.
    """
    domains = np.asarray(domains, dtype=np.int64)
    code_dtype = local_code_dtype(domains)
    local_t = np.ascontiguousarray(local_t)
    if local_t.dtype != code_dtype:
        local_t = local_t.astype(code_dtype)
    errors = np.ascontiguousarray(errors, dtype=np.float64)
    nf, m = local_t.shape
    if m >= 2**31 - 1:
        raise ValueError(f"{m} rows: at most 2^31 - 2 are supported")
    min_sup = int(max(min_sup, 1))
    max_level = nf if max_level <= 0 else min(int(max_level), nf)
    if threads is not None:
        previous_threads = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    previous_chunk = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)
    try:
        return _slice_line(local_t, domains, errors, m, nf, k, alpha, min_sup, max_level, compat, allowed,
                           on_level, memory_limit, extra_per_evaluated)
    finally:
        numba.set_parallel_chunksize(previous_chunk)
        if threads is not None:
            numba.set_num_threads(previous_threads)


class _Record:
    """The evaluated family, grown level by level to exactly the counted size."""

    def __init__(self):
        self.size = np.zeros(0, np.int64)
        self.error = np.zeros(0, np.float64)
        self.sq = np.zeros(0, np.float64)
        self.level = np.zeros(0, np.int8)
        self.n = 0

    def reserve(self, extra: int) -> None:
        total = self.n + extra
        for name in ("size", "error", "sq", "level"):
            array = getattr(self, name)
            if array.shape[0] < total:
                array.resize(total, refcheck=False)  # in place where the allocator can: no second copy

    def put(self, size, error, sq, level) -> np.ndarray:
        n = size.shape[0]
        self.size[self.n:self.n + n] = size
        self.error[self.n:self.n + n] = error
        self.sq[self.n:self.n + n] = sq
        self.level[self.n:self.n + n] = level
        index = np.arange(self.n, self.n + n, dtype=np.int64)
        self.n += n
        return index


def _slice_line(local_t, domains, errors, m, nf, k, alpha, min_sup, max_level, compat, allowed, on_level,
                memory_limit, extra_per_evaluated):
    eavg = float(errors.sum()) / m
    if not eavg > 0:
        raise ValueError("errors sum to 0: every slice scores below 0")
    f_offsets = np.zeros(nf + 1, np.int64)
    np.cumsum(domains, out=f_offsets[1:])
    n_cols = int(f_offsets[-1])
    col_feature = np.repeat(np.arange(nf, dtype=np.int32), domains)
    n_bound = float(n_cols) if compat else float(m)
    tol = 0.0 if compat else 1e-12
    binary = bool(np.all((errors == 0.0) | (errors == 1.0)))
    threads = numba.get_num_threads()
    largest = int(domains.max())
    code_bytes = local_t.dtype.itemsize
    budget = dict(threads=threads, binary=binary, largest_domain=largest, max_level=max_level,
                  code_bytes=code_bytes, extra_per_evaluated=extra_per_evaluated)
    if memory_limit is not None:
        needed = memory_estimate(m, nf, n_cols, **budget)
        if needed > memory_limit:
            _refuse_data(needed, memory_limit, m, nf, n_cols, budget)

    ss, se, sq, sm = _column_stats(local_t, f_offsets, errors, n_cols)
    local_rm = np.empty((m, nf), local_t.dtype)
    _transpose(local_t, local_rm)
    err = (errors != 0.0).view(np.uint8) if binary else np.zeros(0, np.uint8)
    slot_cols = _slot_columns(n_cols, largest, binary)
    # level 2 has one prefix (the empty one): its slot features are split into about 4 tasks per thread
    level2_cols = min(slot_cols, max(largest, -(-n_cols // (4 * threads))))
    keep_pairs = binary and max_level >= 3 and _pair_table_fits(n_cols)

    # level 1: every column with rows is evaluated
    record = _Record()
    present = np.flatnonzero(ss > 0)
    record.reserve(present.size)
    record.put(ss[present], se[present], sq[present], np.ones(present.size, np.int8))
    eval_index = np.full(n_cols, -1, np.int64)
    eval_index[present] = np.arange(present.size)

    seed = (ss >= min_sup) & (se > 0)
    if allowed is not None:
        seed &= np.asarray(allowed, dtype=bool)
    cols = np.flatnonzero(seed)
    S = cols.astype(np.int32)[:, None]
    s_ss, s_se, s_sm, s_sq = ss[cols], se[cols], sm[cols], sq[cols]
    scores = _scores(s_ss, s_se, eavg, alpha, float(m))
    stats = np.column_stack((scores, s_se, s_sm, s_ss.astype(np.float64)))
    top = (np.zeros((0, max_level), np.int32), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    top = _update_top_k(top, S, stats, s_sq, eval_index[cols], k, min_sup)
    levels = [(1, int(n_cols), int(cols.size))]
    if on_level is not None:
        on_level(1, int(n_cols))

    column_counts = ss.astype(np.int32)
    column_errors = se.astype(np.int32) if binary else column_counts
    pair_cnt = pair_err = np.zeros((0, 0), np.int32)
    have_pairs = False
    level = 1
    while S.shape[0] > 0 and level < nf and level < max_level:
        level += 1
        threshold = _threshold(top, k, compat)
        if not compat and np.isfinite(threshold):
            # a parent whose own bound cannot beat the k-th score has no descendant that can
            ub = _parent_bounds(s_ss, s_se, s_sm, eavg, min_sup, alpha, n_bound)
            keep = ub > threshold - tol
            S, s_ss, s_se, s_sm = S[keep], s_ss[keep], s_se[keep], s_sm[keep]
        n = S.shape[0]
        bounds = _group_bounds(S[:, :-1])
        group_end = np.repeat(bounds[1:], np.diff(bounds)).astype(np.int64)
        table = _build_table(S)
        counts = np.zeros(n, np.int64)
        offsets = np.zeros(n + 1, np.int64)
        no_out = np.zeros((0, level), np.int32)
        _generate(S, s_ss, s_se, s_sm, group_end, col_feature, table, min_sup, alpha, eavg, n_bound,
                  threshold, tol, 0, n, counts, offsets, no_out, False)
        np.cumsum(counts, out=offsets[1:])
        n_cand = int(offsets[-1])
        block_ends = _block_ends(offsets, BLOCK_CANDIDATES)
        largest_block = int(np.max(np.diff(offsets[block_ends]))) if n_cand else 0
        last = level >= max_level or level >= nf  # the last level's valid slices are parents of nothing
        if memory_limit is not None:
            needed = memory_estimate(m, nf, n_cols, level=level, block=largest_block,
                                     parents=n if last else max(n, n_cand), evaluated=record.n + n_cand, **budget)
            if needed > memory_limit:
                _refuse_level(needed, memory_limit, level, n_cand, record.n, last, S, s_ss, min_sup, m, nf, n_cols,
                              budget)
        record.reserve(n_cand)
        store_pairs = keep_pairs and level == 2 and max_level >= 3
        if store_pairs:
            pair_cnt = np.zeros((n_cols, n_cols), np.int32)
            pair_err = np.zeros((n_cols, n_cols), np.int32)
        by_feature = binary and level == 3 and have_pairs  # level 3 counted per first feature, with subtraction
        no_pairs = np.zeros((0, 0), np.int32)
        next_parts = []
        n_valid = 0
        collisions = 0
        for a0, a1 in zip(block_ends[:-1], block_ends[1:]):
            n_block = int(offsets[a1] - offsets[a0])
            if n_block == 0:
                continue
            C = np.empty((n_block, level), np.int32)
            _generate(S, s_ss, s_se, s_sm, group_end, col_feature, table, min_sup, alpha, eavg, n_bound,
                      threshold, tol, a0, a1, counts, offsets, C, True)
            if compat:
                collisions += _float_id_collisions(C, col_feature, f_offsets)
            c_ss = np.empty(n_block, np.int64)
            c_se = np.empty(n_block, np.float64)
            c_sq = np.empty(n_block, np.float64)
            c_sm = np.empty(n_block, np.float64)
            starts, ends, lo, hi = _plan_tasks(C, col_feature, f_offsets, slot_cols if level > 2 else level2_cols,
                                               level - 2, by_feature)
            if binary:
                _evaluate_binary(C, starts, ends, lo, hi, by_feature, local_t, local_rm, f_offsets, col_feature, err,
                                 column_counts, column_errors, pair_cnt if (store_pairs or by_feature) else no_pairs,
                                 pair_err if (store_pairs or by_feature) else no_pairs, store_pairs,
                                 c_ss, c_se, c_sq, c_sm)
            else:
                _evaluate_general(C, starts, ends, lo, hi, local_t, local_rm, f_offsets, col_feature, errors,
                                  c_ss, c_se, c_sq, c_sm)
            scores = _scores(c_ss, c_se, eavg, alpha, float(m))
            stats = np.column_stack((scores, c_se, c_sm, c_ss.astype(np.float64)))
            index = record.put(c_ss, c_se, c_sq, level)
            top = _update_top_k(top, C, stats, c_sq, index, k, min_sup)
            valid = (c_ss >= min_sup) & (c_se > 0)
            n_valid += int(valid.sum())
            if not last:
                next_parts.append((C[valid], c_ss[valid], c_se[valid], c_sm[valid]))
            del C, c_ss, c_se, c_sq, c_sm, stats, scores
        if collisions:
            _warn_float_id_collisions(collisions, level)
        have_pairs = store_pairs
        if level >= 3:
            pair_cnt = pair_err = np.zeros((0, 0), np.int32)
        levels.append((level, n_cand, n_valid))
        if on_level is not None:
            on_level(level, n_cand)
        del S, s_ss, s_se, s_sm, table, group_end, counts
        if next_parts:
            S = np.concatenate([p[0] for p in next_parts])
            s_ss = np.concatenate([p[1] for p in next_parts])
            s_se = np.concatenate([p[2] for p in next_parts])
            s_sm = np.concatenate([p[3] for p in next_parts])
        else:
            S = np.zeros((0, level), np.int32)
            s_ss, s_se, s_sm = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        del next_parts

    n_total = record.n
    return SliceLineOutput(
        top_slices=top[0],
        top_stats=top[1],
        top_sq=top[2],
        top_index=top[3],
        evaluated_size=record.size[:n_total],
        evaluated_error=record.error[:n_total],
        evaluated_sq=record.sq[:n_total],
        evaluated_level=record.level[:n_total],
        levels=levels,
    )


def _block_ends(offsets: np.ndarray, block: int) -> np.ndarray:
    """Parent indices cutting the candidates (``offsets (n+1,)``: first candidate of each parent)
    into blocks of at most ``block`` candidates, or one parent's candidates where that is more."""
    n = offsets.shape[0] - 1
    ends = [0]
    while ends[-1] < n:
        start = ends[-1]
        stop = int(np.searchsorted(offsets, offsets[start] + block, side="right")) - 1
        ends.append(min(n, max(stop, start + 1)))
    return np.asarray(ends, np.int64)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def _refuse_data(needed, limit, m, nf, n_cols, budget):
    per_feature = 2 * m * budget["code_bytes"]  # both copies of one feature's codes
    base = needed - nf * per_feature
    fits = {}
    if limit > base + per_feature:
        fits["features"] = int(min((limit - base) // per_feature, nf - 1))
    options = f"at most {fits['features']} features fit" if fits else "use a sample of the rows"
    message = (f"slice search needs ≈ {_fmt_bytes(needed)} for {m} rows × {nf} features ({n_cols} one-hot columns) "
               f"before any candidate, over the {_fmt_bytes(limit)} limit: {options}")
    raise SliceLineMemoryError(message, needed=int(needed), limit=int(limit), level=0, candidates=0, fits=fits)


def _refuse_level(needed, limit, level, n_cand, n_evaluated, last, S, s_ss, min_sup, m, nf, n_cols, budget):
    fits = {}
    if level > 2 or (level == 2 and n_evaluated):
        fits["max_level"] = level - 1
    sup = _min_sup_that_fits(S, s_ss, limit, level, n_evaluated, last, min_sup, m, nf, n_cols, budget)
    if sup is not None:
        fits["min_sup"] = sup
    options = []
    if "min_sup" in fits:
        options.append(f"min_sup ≥ {fits['min_sup']}")
    if "max_level" in fits:
        options.append(f"max_level {fits['max_level']}")
    options.append("fewer features")
    message = (f"level {level} of the slice search has {n_cand} candidates and would need ≈ {_fmt_bytes(needed)}, "
               f"over the {_fmt_bytes(limit)} limit; would fit: {', '.join(options)}")
    raise SliceLineMemoryError(message, needed=int(needed), limit=int(limit), level=level, candidates=n_cand,
                               fits=fits)


def _min_sup_that_fits(S, s_ss, limit, level, n_evaluated, last, min_sup, m, nf, n_cols, budget):
    """The smallest σ above ``min_sup`` for which this level surely fits: its candidates are at most
    the pairs of parents of size ≥ σ sharing a prefix (an upper bound: no count pass per σ)."""
    if S.shape[0] == 0:
        return None
    bounds = _group_bounds(S[:, :-1])
    group = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))

    def fits(sup):
        keep = s_ss >= sup
        per_group = np.bincount(group[keep], minlength=bounds.size - 1).astype(np.int64)
        pairs = int((per_group * (per_group - 1) // 2).sum())
        kept = int(keep.sum())
        estimate = memory_estimate(m, nf, n_cols, level=level, block=min(pairs, BLOCK_CANDIDATES),
                                   parents=kept if last else max(kept, pairs), evaluated=n_evaluated + pairs, **budget)
        return estimate <= limit

    sizes = np.unique(s_ss[s_ss > min_sup])
    if sizes.size == 0 or not fits(int(sizes[-1])):
        return None
    lo, hi = 0, sizes.size - 1  # fits(sizes[hi]) holds; find the first size that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(int(sizes[mid])):
            hi = mid
        else:
            lo = mid + 1
    return int(sizes[lo])


def _float_id_collisions(C, col_feature, f_offsets) -> int:
    """SystemDS identifies a slice by a float64 mixed-radix number; past 2^53 distinct slices can
    share one and SystemDS merges them. Returns how many of ``C`` share one (within the block)."""
    dom = np.diff(f_offsets).astype(np.float64) + 1.0
    weight = np.ones(dom.size)
    for j in range(dom.size - 2, -1, -1):
        weight[j] = weight[j + 1] * dom[j + 1]
    if weight[0] * dom[0] <= 2.0**53:
        return 0
    feature = col_feature[C]
    ids = np.zeros(C.shape[0])
    for t in range(C.shape[1]):
        ids = ids + (C[:, t] - f_offsets[feature[:, t]] + 1) * weight[feature[:, t]]
    return int(C.shape[0] - np.unique(ids).size)


def _warn_float_id_collisions(collisions, level):
    import warnings

    warnings.warn(f"compat: {collisions} candidate slice(s) at level {level} share a float64 ID with another; "
                  "SystemDS would merge them (and may lose a slice); clipengine keeps them apart", stacklevel=4)
