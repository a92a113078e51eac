"""SliceLine: top-K weak-slice discovery over one-hot coded data (Numba).

A slice is a conjunction of predicates ``feature = value`` on distinct features;
with ``m`` rows, mean error ``ē``, a slice S of size ``|S|`` and mean error ``ē_S``
scores ``α·(ē_S/ē − 1) − (1 − α)·(m/|S| − 1)`` (Sagadeeva & Boehm, SIGMOD 2021).

Data layout (converted once by :func:`prepare_codes`):

- ``codes``: ``(m, f)`` int16/int32, C-order — for each row and feature the global
  one-hot column id of its value; column ids are grouped by feature in feature order
  (feature ``j`` owns columns ``offsets[j] .. offsets[j+1]-1``).
- ``errors``: ``(m,)`` float64, non-negative.
- ``col_feature``: ``(n_cols,)`` int32, the feature of each column.
- internally: a column-major copy ``codes_t (f, m)`` (every kernel sweeps one feature at a time)
  and a CSC index (``col_ptr (n_cols+1,) int64``, ``col_rows (m·f,) int32``): the sorted rows of
  each column.

Enumeration is level-wise as SystemDS's ``sliceLine``: level 1 seeds every column with
size ≥ σ and error > 0; a level-L candidate joins two valid level-(L−1) slices sharing
L − 2 predicates (never two predicates on one feature) and is kept only when all its L
parents are valid; its size, error and max error are bounded by the elementwise minimum
over its parents, and the score upper bound is maximised over the sizes
``{σ, max(se/sm, σ), ss}``; candidates are pruned on size, bound ≤ 0 and bound ≤ the
current k-th score. Candidates are identified by sorted tuples of column ids (exact
integers, hashed exactly), produced in lexicographic order (the order SystemDS's
pairing yields, so ties break the same way), and evaluated group by group — all
candidates extending one parent share one pass over that parent's rows — with scratch
memory bounded by ``threads × (m + n_cols)`` whatever the level size.

``compat=True`` reproduces SystemDS's quirks: the bound uses the number of one-hot
columns as ``n`` and the pruning threshold is the lowest score in the current top-K
even when it holds fewer than k slices.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange


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


# ---- njit kernels ---------------------------------------------------------------------------------


@njit(cache=True)
def _column_stats(codes_t, errors, n_cols):
    nf, m = codes_t.shape
    ss = np.zeros(n_cols, np.int64)
    se = np.zeros(n_cols, np.float64)
    sq = np.zeros(n_cols, np.float64)
    sm = np.zeros(n_cols, np.float64)
    for j in range(nf):
        for r in range(m):
            e = errors[r]
            c = codes_t[j, r]
            ss[c] += 1
            se[c] += e
            sq[c] += e * e
            if e > sm[c]:
                sm[c] = e
    return ss, se, sq, sm


@njit(cache=True)
def _build_csc(codes_t, ss):
    nf, m = codes_t.shape
    n_cols = ss.shape[0]
    ptr = np.zeros(n_cols + 1, np.int64)
    for c in range(n_cols):
        ptr[c + 1] = ptr[c] + ss[c]
    fill = ptr[:-1].copy()
    rows = np.empty(m * nf, np.int32)
    for j in range(nf):
        for r in range(m):
            c = codes_t[j, r]
            rows[fill[c]] = r
            fill[c] += 1
    return ptr, rows


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
              threshold, tol, counts, offsets, out, out_parent, fill):
    """Pair valid (L-1)-slices ``S`` (sorted lexicographically) sharing their first L-2 columns.

    First call with ``fill=False`` counts survivors per left parent into ``counts``; second
    call with ``fill=True`` writes candidates at ``offsets`` into ``out (C, L)`` and the left
    parent's index into ``out_parent``.
    """
    n, width = S.shape
    level = width + 1
    for a in prange(n):
        cand = np.empty(level, np.int32)
        for t in range(width):
            cand[t] = S[a, t]
        last_a = S[a, width - 1]
        pos = 0
        if fill:
            pos = offsets[a]
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
                out_parent[pos + kept] = a
            kept += 1
        if not fill:
            counts[a] = kept


@njit(cache=True)
def _count_group(C, i0, i1, block_t, eb, rows, n_rows, feats, n_feats, f_offsets, binary,
                 cnt, esum, esq, emax, out_ss, out_se, out_sq, out_sm, scratch):
    """Histogram the extension features of ``rows`` (sorted) of the column-major ``block_t (f, n)``;
    read off the statistics of candidates i0..i1 (their last column). ``scratch``: ≥ n_rows int32."""
    level = C.shape[1]
    n_err = 0
    if binary:  # errors are counted over the error rows only
        for p in range(n_rows):
            q = rows[p]
            if eb[q] != 0.0:
                scratch[n_err] = q
                n_err += 1
    for u in range(n_feats):
        column = block_t[feats[u]]
        if binary:
            for p in range(n_rows):
                cnt[column[rows[p]]] += 1
            for p in range(n_err):
                esum[column[scratch[p]]] += 1.0
        else:
            for p in range(n_rows):
                q = rows[p]
                x = column[q]
                e = eb[q]
                cnt[x] += 1
                esum[x] += e
                esq[x] += e * e
                if e > emax[x]:
                    emax[x] = e
    for i in range(i0, i1):
        x = C[i, level - 1]
        out_ss[i] = cnt[x]
        out_se[i] = esum[x]
        if binary:
            out_sq[i] = esum[x]
            out_sm[i] = 1.0 if esum[x] > 0 else 0.0
        else:
            out_sq[i] = esq[x]
            out_sm[i] = emax[x]
    for u in range(n_feats):
        f = feats[u]
        for x in range(f_offsets[f], f_offsets[f + 1]):
            cnt[x] = 0
            esum[x] = 0.0
            esq[x] = 0.0
            emax[x] = 0.0


@njit(cache=True)
def _group_features(C, i0, i1, col_feature, feats):
    n_feats = 0
    level = C.shape[1]
    for i in range(i0, i1):
        f = col_feature[C[i, level - 1]]
        if n_feats == 0 or feats[n_feats - 1] != f:
            feats[n_feats] = f
            n_feats += 1
    return n_feats


@njit(cache=True, parallel=True)
def _evaluate(C, group_ptr, super_ptr, codes_t, col_feature, f_offsets, col_ptr, col_rows, errors, binary,
              out_ss, out_se, out_sq, out_sm):
    """Size, error sum, squared-error sum and max error of each candidate in ``C (n, L)``.

    Candidates sharing their first L-1 columns are contiguous (groups, ``group_ptr``); groups
    sharing their first column are contiguous (``super_ptr`` into the groups). Level 2: one
    group per first column, histogrammed straight from the column-major codes over that
    column's (sorted) rows. Level ≥ 3: the first column's rows are gathered into a compact
    column-major block once, reused by all its groups (at level 3 bucketed by the second
    column's feature, one counting sort per feature). ``binary``: errors are 0/1.
    """
    level = C.shape[1]
    nf = codes_t.shape[0]
    n_cols = col_feature.shape[0]
    n_super = super_ptr.shape[0] - 1
    for sg in prange(n_super):
        g_begin = super_ptr[sg]
        g_end = super_ptr[sg + 1]
        c0 = C[group_ptr[g_begin], 0]
        q0 = col_ptr[c0]
        n_block = col_ptr[c0 + 1] - q0
        cnt = np.zeros(n_cols, np.int64)
        esum = np.zeros(n_cols, np.float64)
        esq = np.zeros(n_cols, np.float64)
        emax = np.zeros(n_cols, np.float64)
        feats = np.empty(nf, np.int64)
        if level == 2:
            i0 = group_ptr[g_begin]
            i1 = group_ptr[g_begin + 1]
            n_feats = _group_features(C, i0, i1, col_feature, feats)
            scratch = np.empty(n_block if binary else 0, np.int32)
            _count_group(C, i0, i1, codes_t, errors, col_rows[q0:q0 + n_block], n_block, feats, n_feats,
                         f_offsets, binary, cnt, esum, esq, emax, out_ss, out_se, out_sq, out_sm, scratch)
            continue
        # compact column-major block of the first column's rows (f, m_c0), reused by all its groups
        block = np.empty((nf, n_block), codes_t.dtype)
        eb = np.empty(n_block, np.float64)
        for q in range(n_block):
            eb[q] = errors[col_rows[q0 + q]]
        for j in range(nf):
            source = codes_t[j]
            target = block[j]
            for q in range(n_block):
                target[q] = source[col_rows[q0 + q]]
        rows = np.empty(n_block, np.int32)
        order = np.empty(n_block, np.int32)
        scratch = np.empty(n_block if binary else 0, np.int32)
        bucket = np.zeros(n_cols + 1, np.int64)
        bucket_feature = -1
        for g in range(g_begin, g_end):
            i0 = group_ptr[g]
            i1 = group_ptr[g + 1]
            n_feats = _group_features(C, i0, i1, col_feature, feats)
            if level == 3:
                c1 = C[i0, 1]
                f1 = col_feature[c1]
                if f1 != bucket_feature:
                    # counting sort of the block's rows by feature f1 (stable: rows stay sorted)
                    lo = f_offsets[f1]
                    hi = f_offsets[f1 + 1]
                    for x in range(lo, hi + 1):
                        bucket[x] = 0
                    column = block[f1]
                    for q in range(n_block):
                        bucket[column[q] + 1] += 1
                    for x in range(lo, hi):
                        bucket[x + 1] += bucket[x]
                    for q in range(n_block):
                        x = column[q]
                        order[bucket[x]] = q
                        bucket[x] += 1
                    # bucket[x] is now the end of x's run; its start is bucket[x-1] (or 0)
                    bucket_feature = f1
                start = bucket[c1 - 1] if c1 > f_offsets[f1] else 0
                _count_group(C, i0, i1, block, eb, order[start:bucket[c1]], bucket[c1] - start, feats, n_feats,
                             f_offsets, binary, cnt, esum, esq, emax, out_ss, out_se, out_sq, out_sm, scratch)
            else:
                n_rows = 0
                for q in range(n_block):
                    keep = True
                    for t in range(1, level - 1):
                        c = C[i0, t]
                        if block[col_feature[c], q] != c:
                            keep = False
                            break
                    if keep:
                        rows[n_rows] = q
                        n_rows += 1
                _count_group(C, i0, i1, block, eb, rows, n_rows, feats, n_feats, f_offsets, binary,
                             cnt, esum, esq, emax, out_ss, out_se, out_sq, out_sm, scratch)


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
    """``(m,)`` bool: the rows of the slice whose column ids are ``columns`` (-1 entries ignored)."""
    return _slice_mask(codes, col_feature, np.asarray(columns, dtype=np.int64))


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
) -> SliceLineOutput:
    """Top-K slices by SliceLine score.

    ``codes``: ``(m, f)`` int16/int32 global column ids (see :func:`prepare_codes`);
    ``errors``: ``(m,)`` non-negative float64; ``col_feature``: ``(n_cols,)`` int32;
    ``allowed``: optional ``(n_cols,)`` bool, columns that may appear in a slice (others are
    never seeded, e.g. dropped null levels). ``min_sup`` ≥ 1 rows. ``compat`` reproduces
    SystemDS's output (bound with n = n_cols; threshold = lowest current top-K score).
    ``on_level(level, candidates)``: optional callback after each level is evaluated.
    """
    codes = np.ascontiguousarray(codes)
    if codes.dtype not in (np.int16, np.int32):
        codes = codes.astype(np.int32)
    errors = np.ascontiguousarray(errors, dtype=np.float64)
    col_feature = np.ascontiguousarray(col_feature, dtype=np.int32)
    m, nf = codes.shape
    n_cols = col_feature.shape[0]
    min_sup = int(max(min_sup, 1))
    max_level = nf if max_level <= 0 else min(int(max_level), nf)
    if threads is not None:
        previous_threads = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    previous_chunk = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)
    try:
        return _slice_line(codes, errors, col_feature, n_cols, m, nf, k, alpha, min_sup, max_level, compat, allowed,
                           on_level)
    finally:
        numba.set_parallel_chunksize(previous_chunk)
        if threads is not None:
            numba.set_num_threads(previous_threads)


def _slice_line(codes, errors, col_feature, n_cols, m, nf, k, alpha, min_sup, max_level, compat, allowed, on_level):
    eavg = float(errors.sum()) / m
    if not eavg > 0:
        raise ValueError("errors sum to 0: every slice scores below 0")
    n_bound = float(n_cols) if compat else float(m)
    tol = 0.0 if compat else 1e-12
    codes_t = np.ascontiguousarray(codes.T)  # (f, m): every kernel sweeps one feature's codes at a time
    ss, se, sq, sm = _column_stats(codes_t, errors, n_cols)
    binary = bool(np.all((errors == 0.0) | (errors == 1.0)))
    f_offsets = np.zeros(nf + 1, np.int64)
    np.cumsum(np.bincount(col_feature, minlength=nf), out=f_offsets[1:])
    col_ptr, col_rows = _build_csc(codes_t, ss)

    # level 1: every column with rows is evaluated
    present = np.flatnonzero(ss > 0)
    ev_size, ev_error, ev_sq, ev_level = [ss[present]], [se[present]], [sq[present]], [np.ones(present.size, np.int8)]
    n_evaluated = present.size
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
        dummy = np.zeros((0, level), np.int32)
        dummy_parent = np.zeros(0, np.int64)
        _generate(S, s_ss, s_se, s_sm, group_end, col_feature, table, min_sup, alpha, eavg, n_bound,
                  threshold, tol, counts, offsets, dummy, dummy_parent, False)
        np.cumsum(counts, out=offsets[1:])
        n_cand = int(offsets[-1])
        C = np.empty((n_cand, level), np.int32)
        parent = np.empty(n_cand, np.int64)
        if n_cand:
            _generate(S, s_ss, s_se, s_sm, group_end, col_feature, table, min_sup, alpha, eavg, n_bound,
                      threshold, tol, counts, offsets, C, parent, True)
        if compat and n_cand:
            _warn_float_id_collisions(C, col_feature, f_offsets, level)
        c_ss = np.zeros(n_cand, np.int64)
        c_se = np.zeros(n_cand, np.float64)
        c_sq = np.zeros(n_cand, np.float64)
        c_sm = np.zeros(n_cand, np.float64)
        if n_cand:
            group_ptr = np.flatnonzero(np.concatenate(([True], parent[1:] != parent[:-1], [True]))).astype(np.int64)
            first = C[group_ptr[:-1], 0]
            super_ptr = np.flatnonzero(np.concatenate(([True], first[1:] != first[:-1], [True]))).astype(np.int64)
            _evaluate(C, group_ptr, super_ptr, codes_t, col_feature, f_offsets, col_ptr, col_rows, errors, binary,
                      c_ss, c_se, c_sq, c_sm)
        scores = _scores(c_ss, c_se, eavg, alpha, float(m))
        stats = np.column_stack((scores, c_se, c_sm, c_ss.astype(np.float64)))
        index = n_evaluated + np.arange(n_cand, dtype=np.int64)
        ev_size.append(c_ss)
        ev_error.append(c_se)
        ev_sq.append(c_sq)
        ev_level.append(np.full(n_cand, level, np.int8))
        n_evaluated += n_cand
        top = _update_top_k(top, C, stats, c_sq, index, k, min_sup)
        valid = (c_ss >= min_sup) & (c_se > 0)
        levels.append((level, n_cand, int(valid.sum())))
        if on_level is not None:
            on_level(level, n_cand)
        S, s_ss, s_se, s_sm = C[valid], c_ss[valid], c_se[valid], c_sm[valid]

    return SliceLineOutput(
        top_slices=top[0],
        top_stats=top[1],
        top_sq=top[2],
        top_index=top[3],
        evaluated_size=np.concatenate(ev_size),
        evaluated_error=np.concatenate(ev_error),
        evaluated_sq=np.concatenate(ev_sq),
        evaluated_level=np.concatenate(ev_level),
        levels=levels,
    )


def _warn_float_id_collisions(C, col_feature, f_offsets, level):
    """SystemDS identifies a slice by a float64 mixed-radix number; past 2^53 distinct slices can
    share one and SystemDS merges them. Compat mode keeps them apart and says so."""
    dom = np.diff(f_offsets).astype(np.float64) + 1.0
    weight = np.ones(dom.size)
    for j in range(dom.size - 2, -1, -1):
        weight[j] = weight[j + 1] * dom[j + 1]
    if weight[0] * dom[0] <= 2.0**53:
        return
    feature = col_feature[C]
    ids = np.zeros(C.shape[0])
    for t in range(C.shape[1]):
        ids = ids + (C[:, t] - f_offsets[feature[:, t]] + 1) * weight[feature[:, t]]
    collisions = C.shape[0] - np.unique(ids).size
    if collisions:
        import warnings

        warnings.warn(f"compat: {collisions} candidate slice(s) at level {level} share a float64 ID with another; "
                      "SystemDS would merge them (and may lose a slice); clipengine keeps them apart", stacklevel=3)


@njit(cache=True)
def _parent_bounds(ss, se, sm, eavg, min_sup, alpha, n):
    out = np.empty(ss.shape[0], np.float64)
    for i in range(ss.shape[0]):
        out[i] = _score_ub(float(ss[i]), se[i], sm[i], eavg, min_sup, alpha, n)
    return out
