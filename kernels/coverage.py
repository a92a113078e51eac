"""t-way value-combination counts over coded columns (Numba): the compute of combinatorial coverage.

Data layout (converted once by the caller):

- ``codes``: ``(f, m)`` int16, feature-major — for each feature and row the value's index
  ``0 .. domains[j]-1``, or ``-1`` (:data:`UNKNOWN`) when the row has no usable value for that feature
  (null, outside the domain, a label below a confidence floor). Such a row counts in no combination of
  a feature set containing that feature, and in every other set as usual.
- ``domains``: ``(f,)`` int64, number of values of each feature.
- A *feature set* is ``t`` feature indices in increasing order; the sets of one ``t`` are all
  ``C(f, t)`` of them in lexicographic order (``itertools.combinations``). A *combination* of set
  ``(f_1, …, f_t)`` is one value per feature; its flat index is ``set_offsets[s]`` plus the
  mixed-radix number of its values, first feature most significant (``((v_1·d_2 + v_2)·d_3 + v_3)…``).
  :class:`CombinationPlan` holds that layout.

Counting (:func:`count_combinations`) works on bitmaps: the rows holding value ``v`` of feature ``j``
are one bit per row, in blocks of rows small enough that one block of every value's bitmap stays in
the L2 cache. Sets sharing their first ``t − 1`` features form a group. For each block and each value
combination of a group's prefix, the prefix bitmap is the AND of ``t − 1`` value bitmaps, kept level
by level (an empty level skips every combination below it), and a combination's count is
``popcount(prefix AND bitmap(last value))``. All values of the last prefix feature are held at once
so each last-feature bitmap is read once for up to four
prefixes; the loop is LLVM vector IR over 512-bit steps (``vpopcntq`` on AVX-512 VPOPCNTDQ CPUs,
LLVM's own popcount sequence elsewhere). Per feature set this reads ``∏ d / 64`` words per row
instead of visiting every row.

Two identities remove most of the popcounts. A *complete* feature (no ``-1`` row) has every row in
exactly one of its values, so (1) the last value of the last feature is the prefix's count minus the
others, and (2) a combination holding the last value of a complete feature at a prefix position ``j``
is ``count(set without j) − Σ_{w < d_j − 1} count(…, v_j = w, …)``, from the level below
(:func:`_fill_derived`). Only ``∏ (d_i − 1)`` combinations per set of complete features are
popcounted: one in eight for three binary features.

Weighted sums (label probabilities, non-binary errors; :func:`sum_combinations`) cannot be
popcounted: they walk the rows of each non-empty prefix bitmap instead (one visit per row and set).

Groups are dealt to the threads by estimated work (longest first); each thread streams every block
once and owns the output ranges of its groups, so no two threads write the same counter. Numba
threads: ``threads`` (set and restored), else the caller's setting. This module never imports the
engine.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

MAX_T = 4
UNKNOWN = -1  # code of a row without a usable value for a feature
CHUNK_ROWS = 1 << 18  # rows packed into bitmaps at a time: bounds the bitmap memory; one progress step each
MAX_BLOCK_ROWS = 65_536  # rows per bitmap block, at most ...
MIN_BLOCK_ROWS = 4_096  # ... and at least
SUM_BLOCK_ROWS = 4_096  # rows per block when walking rows: the block's codes and weights stay in the L2 cache
BLOCK_BYTES = 3 << 19  # one block of every value's bitmap: within a 2 MiB L2 cache with room to spare
_LANES = 8  # 64-bit words per vector step (one 512-bit register); block rows are a multiple of 64 × _LANES
_PREFIX_BATCH = 8  # values of the last prefix feature whose prefix bitmaps are held at once


class CombinationPlan(NamedTuple):
    """Where each combination of each ``t``-feature set lives in the flat arrays.

    - ``t``: features per set; ``domains``: ``(f,)`` int64, values per feature.
    - ``sets``: ``(S, t)`` int32, the feature sets in lexicographic order.
    - ``set_offsets``: ``(S + 1,)`` int64, first flat index of each set's combinations (last: the total).
    - ``group_sets``: ``(G + 1,)`` int64: sets ``group_sets[g] .. group_sets[g+1]-1`` share their first
      ``t − 1`` features.
    """

    t: int
    domains: np.ndarray
    sets: np.ndarray
    set_offsets: np.ndarray
    group_sets: np.ndarray

    @property
    def n_combinations(self) -> int:
        return int(self.set_offsets[-1])

    @property
    def n_sets(self) -> int:
        return int(self.sets.shape[0])

    def set_of(self, index: np.ndarray) -> np.ndarray:
        """``(N,)`` int64: the set of each flat combination index."""
        return np.searchsorted(self.set_offsets, np.asarray(index, dtype=np.int64), side="right") - 1

    def decode(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sets (N,) int64, values (N, t) int64)``: the set and the value of each feature of each
        flat index."""
        index = np.asarray(index, dtype=np.int64)
        sets = self.set_of(index)
        local = index - self.set_offsets[sets]
        values = np.empty((index.shape[0], self.t), np.int64)
        features = self.sets[sets]
        for position in range(self.t - 1, -1, -1):
            d = self.domains[features[:, position]]
            values[:, position] = local % d
            local = local // d
        return sets, values


def plan_combinations(domains: np.ndarray, t: int) -> CombinationPlan:
    """The layout of every ``t``-feature set's combinations over features with ``domains`` (f,) values."""
    domains = np.ascontiguousarray(domains, dtype=np.int64)
    n_features = domains.shape[0]
    if not 1 <= t <= min(MAX_T, n_features):
        raise ValueError(f"t must be in 1..{min(MAX_T, n_features)} for {n_features} features, not {t}")
    sets = np.array(list(itertools.combinations(range(n_features), t)), dtype=np.int32).reshape(-1, t)
    set_offsets = np.zeros(sets.shape[0] + 1, np.int64)
    np.cumsum(np.prod(domains[sets], axis=1), out=set_offsets[1:])
    if t == 1:
        group_sets = np.array([0, sets.shape[0]], np.int64)
    else:
        prefix = sets[:, :-1]
        starts = np.flatnonzero(np.concatenate(([True], np.any(prefix[1:] != prefix[:-1], axis=1))))
        group_sets = np.concatenate((starts, [sets.shape[0]])).astype(np.int64)
    return CombinationPlan(t, domains, sets, set_offsets, group_sets)


def value_offsets(domains: np.ndarray) -> np.ndarray:
    """``(f + 1,)`` int64: the global index of value 0 of each feature (values numbered feature by feature)."""
    offsets = np.zeros(len(domains) + 1, np.int64)
    np.cumsum(np.asarray(domains, dtype=np.int64), out=offsets[1:])
    return offsets


def lower_sets(plan: CombinationPlan, lower: CombinationPlan) -> np.ndarray:
    """``(S, t)`` int64: the index in ``lower`` (the plan of ``t − 1``) of each set of ``plan`` without
    its position j."""
    t = plan.t
    n_features = plan.domains.shape[0]
    weights = n_features ** np.arange(t - 2, -1, -1, dtype=np.int64)  # lexicographic order = numeric order
    keys = lower.sets.astype(np.int64) @ weights
    out = np.empty((plan.n_sets, t), np.int64)
    for j in range(t):
        out[:, j] = np.searchsorted(keys, np.delete(plan.sets, j, axis=1).astype(np.int64) @ weights)
    return out


def block_rows_for(n_values: int) -> int:
    """Rows per bitmap block for ``n_values`` bitmaps: the largest power of two in
    [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS] whose block of every bitmap fits ``BLOCK_BYTES``."""
    rows = MAX_BLOCK_ROWS
    while rows > MIN_BLOCK_ROWS and max(n_values, 1) * rows // 8 > BLOCK_BYTES:
        rows //= 2
    return rows


def _deal_groups(plan: CombinationPlan, workers: int, walk_rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """Groups dealt to ``workers`` lists, longest first, each to the least loaded: ``(ptr (W+1,), groups)``."""
    n_groups = plan.group_sets.shape[0] - 1
    first = plan.sets[plan.group_sets[:-1]]
    prefix_values = np.prod(plan.domains[first[:, :-1]], axis=1) if plan.t > 1 else np.ones(n_groups, np.int64)
    last_values = np.add.reduceat(plan.domains[plan.sets[:, -1]], plan.group_sets[:-1])
    # popcounting reads prefix × last-value bitmaps; walking rows visits each row once per set
    cost = np.diff(plan.group_sets) if walk_rows else prefix_values * last_values
    load = np.zeros(workers)
    owner = np.empty(n_groups, np.int64)
    for g in np.argsort(-cost, kind="stable"):
        w = int(np.argmin(load))
        owner[g] = w
        load[w] += cost[g]
    worker_ptr = np.zeros(workers + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=workers), out=worker_ptr[1:])
    return worker_ptr, np.argsort(owner, kind="stable").astype(np.int64)


# ---- bit intrinsics ---------------------------------------------------------------------------------


@intrinsic
def _popcount(typingctx, word):
    """Set bits of a 64-bit word (LLVM ``ctpop``)."""
    if not (isinstance(word, types.Integer) and word.bitwidth == 64):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(word), codegen


@intrinsic
def _trailing_zeros(typingctx, word):
    """Index of the lowest set bit of a non-zero 64-bit word (LLVM ``cttz``)."""
    if not (isinstance(word, types.Integer) and word.bitwidth == 64):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))  # 1: undefined for a zero word

    return types.uint64(word), codegen


def _make_and_counts(n_prefixes: int):
    """An intrinsic ``(prefixes (k, W) uint64 C, first, bitmap (W,) uint64 C) -> UniTuple(uint64, n)``:
    ``popcount(prefixes[first + j] AND bitmap)`` for j < n, as LLVM vector IR over 8-word steps
    (W a multiple of 8): the bitmap is loaded once for the n prefixes."""

    @intrinsic
    def and_counts(typingctx, prefixes, first, bitmap):
        if not (isinstance(prefixes, types.Array) and prefixes.ndim == 2 and prefixes.layout == "C"
                and prefixes.dtype == types.uint64 and isinstance(bitmap, types.Array) and bitmap.ndim == 1
                and bitmap.layout == "C" and bitmap.dtype == types.uint64 and isinstance(first, types.Integer)):
            return None
        result = types.UniTuple(types.uint64, n_prefixes)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            vector = ir.VectorType(i64, _LANES)
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                                   f"llvm.ctpop.v{_LANES}i64")
            table = context.make_array(signature.args[0])(context, builder, args[0])
            words = builder.extract_value(table.shape, 1)
            row0 = context.cast(builder, args[1], signature.args[1], types.int64)
            rows = [builder.gep(table.data, [builder.mul(builder.add(row0, i64(j)), words)]) for j in range(n_prefixes)]
            other = context.make_array(signature.args[2])(context, builder, args[2]).data
            sums = [cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in range(n_prefixes)]
            with cgutils.for_range(builder, builder.udiv(words, i64(_LANES))) as loop:
                at = builder.mul(loop.index, i64(_LANES))
                word = builder.load(builder.bitcast(builder.gep(other, [at]), vector.as_pointer()), align=8)
                for j in range(n_prefixes):
                    mine = builder.load(builder.bitcast(builder.gep(rows[j], [at]), vector.as_pointer()), align=8)
                    counted = builder.call(ctpop, [builder.and_(mine, word)])
                    builder.store(builder.add(builder.load(sums[j]), counted), sums[j])
            totals = []
            for j in range(n_prefixes):
                lanes = builder.load(sums[j])
                total = builder.extract_element(lanes, i64(0))
                for lane in range(1, _LANES):
                    total = builder.add(total, builder.extract_element(lanes, i64(lane)))
                totals.append(total)
            return context.make_tuple(builder, result, totals)

        return result(prefixes, first, bitmap), codegen

    return and_counts


_and_counts1, _and_counts2, _and_counts3, _and_counts4 = (_make_and_counts(n) for n in range(1, 5))


@njit(cache=True, inline="always")
def _and_count_many(prefixes, first, n, bitmap, sums):
    """``sums[j] = popcount(prefixes[first + j] AND bitmap)`` for j < n ≤ 4."""
    if n == 4:
        sums[0], sums[1], sums[2], sums[3] = _and_counts4(prefixes, first, bitmap)
    elif n == 3:
        sums[0], sums[1], sums[2] = _and_counts3(prefixes, first, bitmap)
    elif n == 2:
        sums[0], sums[1] = _and_counts2(prefixes, first, bitmap)
    else:
        sums[0] = _and_counts1(prefixes, first, bitmap)[0]


@njit(cache=True, inline="always")
def _copy_count(source, target):
    total = np.uint64(0)
    for i in range(source.shape[0]):
        word = source[i]
        target[i] = word
        total += _popcount(word)
    return total


@njit(cache=True, inline="always")
def _and_into_count(a, b, target):
    total = np.uint64(0)
    for i in range(a.shape[0]):
        word = a[i] & b[i]
        target[i] = word
        total += _popcount(word)
    return total


# ---- packing ----------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _and_prefix(block, offsets, group_prefix, g, digits, partial, level, stop):
    """AND group ``g``'s prefix value bitmaps (value ``digits[lv]`` of feature ``group_prefix[g, lv]``) into
    ``partial[lv]``, from ``level`` down to ``stop``: → the first level whose AND is empty, else ``stop``."""
    while level < stop:
        source = block[offsets[group_prefix[g, level]] + digits[level]]
        if level == 0:
            n = _copy_count(source, partial[0])
        else:
            n = _and_into_count(partial[level - 1], source, partial[level])
        if n == 0:
            break
        level += 1
    return level


@njit(cache=True, parallel=True)
def _pack_bitmaps(codes, offsets, start, stop, block_rows, out):
    """Set each row of ``codes[:, start:stop]`` in its value's bitmap: ``out`` (n_blocks, V, W) uint64, zeroed."""
    for j in prange(codes.shape[0]):
        offset = offsets[j]
        for r in range(start, stop):
            c = codes[j, r]
            if c >= 0:
                local = r - start
                block = local // block_rows
                within = local - block * block_rows
                out[block, offset + c, within >> 6] |= np.uint64(1) << np.uint64(within & 63)


@njit(cache=True)
def _pack_rows(flags, start, stop, block_rows, out):
    """Bitmap of ``flags[start:stop]`` (bool) into ``out`` (n_blocks, W) uint64, zeroed."""
    for r in range(start, stop):
        if flags[r]:
            local = r - start
            block = local // block_rows
            within = local - block * block_rows
            out[block, within >> 6] |= np.uint64(1) << np.uint64(within & 63)


# ---- counting ---------------------------------------------------------------------------------------


@njit(cache=True)
def _count_group_block(block, rows, g, offsets, domains, complete, group_prefix, group_sets, set_last, set_offsets,
                       counts, partial, prefixes, entry_count, entry_index, totals, sums, values):
    depth = group_prefix.shape[1]
    outer = max(depth - 1, 0)  # prefix levels walked value by value; the last prefix level is held whole
    feature = 0
    for level in range(outer):
        values[level] = 0
        feature = group_prefix[g, level]
        if domains[feature] - complete[feature] == 0:
            return
    level = 0
    while True:
        level = _and_prefix(block, offsets, group_prefix, g, values, partial, level, outer)
        if level == outer:
            outer_index = 0
            for lv in range(outer):
                outer_index = outer_index * domains[group_prefix[g, lv]] + values[lv]
            if depth == 0:
                n_values, domain = 1, 1
            else:
                feature = group_prefix[g, depth - 1]
                n_values, domain = domains[feature] - complete[feature], domains[feature]
            for batch in range(0, n_values, _PREFIX_BATCH):
                k = 0
                for w in range(batch, min(n_values, batch + _PREFIX_BATCH)):
                    if depth == 0:
                        c = _copy_count(rows, prefixes[k])
                    elif depth == 1:
                        c = _copy_count(block[offsets[feature] + w], prefixes[k])
                    else:
                        c = _and_into_count(partial[depth - 2], block[offsets[feature] + w], prefixes[k])
                    if c > 0:
                        entry_count[k] = c
                        entry_index[k] = outer_index * domain + w
                        k += 1
                if k == 0:
                    continue
                for s in range(group_sets[g], group_sets[g + 1]):
                    e = set_last[s]
                    d = domains[e]
                    start = set_offsets[s]
                    for j in range(k):
                        totals[j] = 0
                    for v in range(d - complete[e]):
                        bitmap = block[offsets[e] + v]
                        for first in range(0, k, 4):
                            chunk = min(4, k - first)
                            _and_count_many(prefixes, first, chunk, bitmap, sums)
                            for j in range(chunk):
                                counts[start + entry_index[first + j] * d + v] += sums[j]
                                totals[first + j] += sums[j]
                    if complete[e]:  # identity (1): the last value is the prefix's rest
                        for j in range(k):
                            counts[start + entry_index[j] * d + d - 1] += entry_count[j] - totals[j]
            level = outer - 1
        # next prefix value at `level`; the last value of a complete feature is left to _fill_derived
        while level >= 0:
            values[level] += 1
            feature = group_prefix[g, level]
            if values[level] < domains[feature] - complete[feature]:
                break
            values[level] = 0
            level -= 1
        if level < 0:
            return


@njit(cache=True, parallel=True)
def _count_kernel(bitmaps, rows, offsets, domains, complete, group_prefix, group_sets, set_last, set_offsets,
                  worker_ptr, worker_groups, counts):
    """Add one chunk's counts into ``counts`` (C,) int64, except the combinations :func:`_fill_derived`
    completes.

    ``bitmaps`` (n_blocks, V, W) uint64 (W a multiple of 8); ``rows`` (n_blocks, W) uint64: the chunk's
    rows; ``group_prefix`` (G, t − 1) int32: each group's shared features; ``set_last`` (S,) int32: each
    set's last feature; ``complete`` (f,) int64: 1 for a feature without -1 rows.
    """
    n_words = bitmaps.shape[2]
    depth = group_prefix.shape[1]
    for worker in prange(worker_ptr.shape[0] - 1):
        partial = np.empty((max(depth - 1, 1), n_words), np.uint64)
        prefixes = np.empty((_PREFIX_BATCH, n_words), np.uint64)
        entry_count = np.empty(_PREFIX_BATCH, np.uint64)
        entry_index = np.empty(_PREFIX_BATCH, np.int64)
        totals = np.empty(_PREFIX_BATCH, np.uint64)
        sums = np.empty(4, np.uint64)
        values = np.zeros(max(depth, 1), np.int64)
        for b in range(bitmaps.shape[0]):
            for gi in range(worker_ptr[worker], worker_ptr[worker + 1]):
                _count_group_block(bitmaps[b], rows[b], worker_groups[gi], offsets, domains, complete, group_prefix,
                                   group_sets, set_last, set_offsets, counts, partial, prefixes, entry_count,
                                   entry_index, totals, sums, values)


@njit(cache=True, parallel=True)
def _fill_derived(sets, set_offsets, domains, complete, drop_set, lower_offsets, lower, counts):
    """The combinations :func:`_count_kernel` leaves out — holding the last value of a complete feature
    at a prefix position — by identity (2): with ``j`` the first such position,
    ``count(v) = lower(v without j) − Σ_{w < d_j − 1} count(v with v_j = w)``. The terms on the right
    come earlier in each set's order, so one pass in order suffices.

    ``sets`` (S, t) int32; ``drop_set`` (S, t) int64 (:func:`lower_sets`); ``lower_offsets`` /
    ``lower`` (C',) int64: the final counts of level t − 1; ``counts`` (C,), completed in place.
    """
    n_sets, t = sets.shape
    for s in prange(n_sets):
        features = sets[s]
        stride = np.empty(t, np.int64)
        digits = np.empty(t, np.int64)
        size = 1
        for j in range(t - 1, -1, -1):
            stride[j] = size
            size *= domains[features[j]]
        base = set_offsets[s]
        for local in range(size):
            rest = local
            for j in range(t - 1, -1, -1):
                d = domains[features[j]]
                digits[j] = rest % d
                rest //= d
            first = -1
            for j in range(t - 1):
                f = features[j]
                if complete[f] and digits[j] == domains[f] - 1:
                    first = j
                    break
            if first < 0:
                continue
            lower_index = 0
            for i in range(t):
                if i != first:
                    lower_index = lower_index * domains[features[i]] + digits[i]
            value = lower[lower_offsets[drop_set[s, first]] + lower_index]
            for w in range(domains[features[first]] - 1):
                value -= counts[base + local - (digits[first] - w) * stride[first]]
            counts[base + local] = value


def _check_codes(codes: np.ndarray, domains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.ascontiguousarray(codes)
    if codes.ndim != 2 or codes.dtype != np.int16:
        raise ValueError("codes must be (f, m) int16")
    domains = np.ascontiguousarray(domains, dtype=np.int64)
    if domains.shape != (codes.shape[0],) or np.any(domains < 1) or np.any(domains > np.iinfo(np.int16).max):
        raise ValueError("domains must be (f,) with 1 ≤ d ≤ 32767")
    return codes, domains


def _with_threads(threads: int | None, fn):
    if threads is None:
        return fn()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        return fn()
    finally:
        numba.set_num_threads(previous)


def count_combinations(
    codes: np.ndarray,
    domains: np.ndarray,
    max_t: int,
    *,
    threads: int | None = None,
    block_rows: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    on_rows: Callable[[int], None] | None = None,
) -> list[tuple[CombinationPlan, np.ndarray]]:
    """Rows per value combination of every ``t``-feature set, for t = 1 .. ``max_t`` (≤ 4): one
    ``(plan, counts (C,) int64)`` per t, in order.

    ``codes`` (f, m) int16 (``-1``: no usable value), ``domains`` (f,) values per feature.
    Counts among a subset of the rows (e.g. the rows with an error) are the counts of those rows'
    codes (``codes[:, subset]``). ``block_rows`` None: sized by :func:`block_rows_for`; else a positive
    multiple of 512. ``on_rows(n)`` after each chunk of ``n`` rows.
    """
    codes, domains = _check_codes(codes, domains)
    n_features, m = codes.shape
    offsets = value_offsets(domains)
    block_rows = block_rows_for(int(offsets[-1])) if block_rows is None else int(block_rows)
    if block_rows <= 0 or block_rows % (64 * _LANES):
        raise ValueError(f"block_rows must be a positive multiple of {64 * _LANES}")
    plans = [plan_combinations(domains, t) for t in range(1, max_t + 1)]
    complete = np.all(codes >= 0, axis=1).astype(np.int64)
    counts = [np.zeros(plan.n_combinations, np.int64) for plan in plans]
    words = block_rows // 64
    chunk_rows = max(block_rows, (chunk_rows // block_rows) * block_rows)

    def run():
        workers = numba.get_num_threads()
        layouts = []
        for plan in plans:
            worker_ptr, worker_groups = _deal_groups(plan, workers, walk_rows=False)
            group_prefix = np.ascontiguousarray(plan.sets[plan.group_sets[:-1], : plan.t - 1], dtype=np.int32)
            layouts.append((worker_ptr, worker_groups, group_prefix, np.ascontiguousarray(plan.sets[:, -1])))
        all_rows = np.ones(m, np.bool_)
        for start in range(0, m, chunk_rows):
            stop = min(m, start + chunk_rows)
            n_blocks = -(-(stop - start) // block_rows)
            bitmaps = np.zeros((n_blocks, int(offsets[-1]), words), np.uint64)
            _pack_bitmaps(codes, offsets, start, stop, block_rows, bitmaps)
            rows = np.zeros((n_blocks, words), np.uint64)
            _pack_rows(all_rows, start, stop, block_rows, rows)
            for plan, (worker_ptr, worker_groups, group_prefix, set_last), c in zip(plans, layouts, counts):
                _count_kernel(bitmaps, rows, offsets, domains, complete, group_prefix, plan.group_sets, set_last,
                              plan.set_offsets, worker_ptr, worker_groups, c)
            if on_rows is not None:
                on_rows(stop - start)
        for level in range(1, len(plans)):
            plan, lower = plans[level], plans[level - 1]
            _fill_derived(plan.sets, plan.set_offsets, domains, complete, lower_sets(plan, lower), lower.set_offsets,
                          counts[level - 1], counts[level])

    _with_threads(threads, run)
    return list(zip(plans, counts))


# ---- weighted sums ------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _sum_kernel(bitmaps, rows, codes, row0, block_rows, weights, use_weights, values, offsets, domains, group_prefix,
                group_sets, set_last, set_offsets, worker_ptr, worker_groups, sums):
    """Add one chunk's weighted sums into ``sums`` (R, C) float64: for each row in a combination,
    ``∏_{features of the set} weights[j, row] × values[r, row]`` (weights 1 without ``use_weights``).

    ``codes`` (f, m) int16 and ``weights`` (f, m) float32 are the whole table; ``row0`` is the chunk's
    first row; ``values`` (R, m) float64.
    """
    n_words = bitmaps.shape[2]
    depth = group_prefix.shape[1]
    n_channels = values.shape[0]
    for worker in prange(worker_ptr.shape[0] - 1):
        partial = np.empty((max(depth, 1), n_words), np.uint64)
        digits = np.zeros(max(depth, 1), np.int64)
        row_list = np.empty(n_words * 64, np.int64)
        row_values = np.empty((n_channels, n_words * 64), np.float64)
        for b in range(bitmaps.shape[0]):
            block = bitmaps[b]
            for gi in range(worker_ptr[worker], worker_ptr[worker + 1]):
                g = worker_groups[gi]
                for level in range(depth):
                    digits[level] = 0
                level = 0
                while True:
                    level = _and_prefix(block, offsets, group_prefix, g, digits, partial, level, depth)
                    if level == depth:
                        prefix = partial[depth - 1] if depth > 0 else rows[b]
                        prefix_index = 0
                        for lv in range(depth):
                            prefix_index = prefix_index * domains[group_prefix[g, lv]] + digits[lv]
                        listed = 0  # the prefix's rows, with their weight × value per channel
                        for i in range(n_words):
                            word = prefix[i]
                            while word != 0:
                                row = row0 + b * block_rows + i * 64 + np.int64(_trailing_zeros(word))
                                word &= word - np.uint64(1)
                                weight = 1.0
                                if use_weights:
                                    for lv in range(depth):
                                        weight *= weights[group_prefix[g, lv], row]
                                row_list[listed] = row
                                for r in range(n_channels):
                                    row_values[r, listed] = weight * values[r, row]
                                listed += 1
                        for s in range(group_sets[g], group_sets[g + 1]):
                            e = set_last[s]
                            base = set_offsets[s] + prefix_index * domains[e]
                            for r in range(n_channels):
                                for i in range(listed):
                                    row = row_list[i]
                                    code = codes[e, row]
                                    if code >= 0:
                                        w = row_values[r, i] * weights[e, row] if use_weights else row_values[r, i]
                                        sums[r, base + code] += w
                        level = depth - 1
                    while level >= 0:
                        digits[level] += 1
                        if digits[level] < domains[group_prefix[g, level]]:
                            break
                        digits[level] = 0
                        level -= 1
                    if level < 0:
                        break


def sum_combinations(
    codes: np.ndarray,
    domains: np.ndarray,
    t: int,
    *,
    values: np.ndarray,
    weights: np.ndarray | None = None,
    threads: int | None = None,
    block_rows: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    on_rows: Callable[[int], None] | None = None,
) -> tuple[CombinationPlan, np.ndarray]:
    """Weighted sums per value combination of every ``t``-feature set: ``(plan, sums (R, C) float64)``
    with ``sums[r, c] = Σ_{rows in c} (∏_{j in the set} weights[j, row]) · values[r, row]``.

    ``codes`` (f, m) int16, ``domains`` (f,); ``values`` (R, m) float64 (a row of ones gives
    weighted counts); ``weights`` (f, m) float32 or None (all 1).
    """
    codes, domains = _check_codes(codes, domains)
    n_features, m = codes.shape
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != m:
        raise ValueError(f"values must be (R, {m})")
    use_weights = weights is not None
    weights = (np.ascontiguousarray(weights, dtype=np.float32) if use_weights
               else np.ones((n_features, 1), np.float32))
    if use_weights and weights.shape != codes.shape:
        raise ValueError(f"weights must be {codes.shape}")
    offsets = value_offsets(domains)
    block_rows = SUM_BLOCK_ROWS if block_rows is None else int(block_rows)
    if block_rows <= 0 or block_rows % 64:
        raise ValueError("block_rows must be a positive multiple of 64")
    plan = plan_combinations(domains, t)
    sums = np.zeros((values.shape[0], plan.n_combinations), np.float64)
    group_prefix = np.ascontiguousarray(plan.sets[plan.group_sets[:-1], : t - 1], dtype=np.int32)
    set_last = np.ascontiguousarray(plan.sets[:, -1])
    words = block_rows // 64
    chunk_rows = max(block_rows, (chunk_rows // block_rows) * block_rows)

    def run():
        worker_ptr, worker_groups = _deal_groups(plan, numba.get_num_threads(), walk_rows=True)
        all_rows = np.ones(m, np.bool_)
        for start in range(0, m, chunk_rows):
            stop = min(m, start + chunk_rows)
            n_blocks = -(-(stop - start) // block_rows)
            bitmaps = np.zeros((n_blocks, int(offsets[-1]), words), np.uint64)
            _pack_bitmaps(codes, offsets, start, stop, block_rows, bitmaps)
            rows = np.zeros((n_blocks, words), np.uint64)
            _pack_rows(all_rows, start, stop, block_rows, rows)
            _sum_kernel(bitmaps, rows, codes, start, block_rows, weights, use_weights, values, offsets, domains,
                        group_prefix, plan.group_sets, set_last, plan.set_offsets, worker_ptr, worker_groups, sums)
            if on_rows is not None:
                on_rows(stop - start)

    _with_threads(threads, run)
    return plan, sums


# ---- per-combination facts ----------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _expected_kernel(sets, set_offsets, domains, offsets, shares, out):
    n_sets, t = sets.shape
    for s in prange(n_sets):
        features = sets[s]
        size = set_offsets[s + 1] - set_offsets[s]
        for local in range(size):
            rest = local
            product = 1.0
            for j in range(t - 1, -1, -1):
                d = domains[features[j]]
                product *= shares[offsets[features[j]] + rest % d]
                rest //= d
            out[set_offsets[s] + local] = product


def expected_shares(plan: CombinationPlan, shares: np.ndarray) -> np.ndarray:
    """``(C,)`` float64: the product of the values' shares of each combination — its expected share of
    the rows if the features were independent. ``shares`` (V,) float64 per value (:func:`value_offsets`)."""
    out = np.empty(plan.n_combinations, np.float64)
    _expected_kernel(plan.sets, plan.set_offsets, plan.domains, value_offsets(plan.domains),
                     np.ascontiguousarray(shares, dtype=np.float64), out)
    return out


@njit(cache=True, parallel=True)
def _excluded_kernel(sets, set_offsets, domains, offsets, rule_features, rule_allowed, out):
    n_sets, t = sets.shape
    n_rules, width = rule_features.shape
    for s in prange(n_sets):
        features = sets[s]
        size = set_offsets[s + 1] - set_offsets[s]
        for r in range(n_rules):
            # the rule applies to this set when each of its features is in the set
            positions = np.full(width, -1, np.int64)
            applies = True
            for k in range(width):
                f = rule_features[r, k]
                if f < 0:
                    break
                for j in range(t):
                    if features[j] == f:
                        positions[k] = j
                if positions[k] < 0:
                    applies = False
                    break
            if not applies:
                continue
            for local in range(size):
                rest = local
                hit = True
                for j in range(t - 1, -1, -1):
                    d = domains[features[j]]
                    v = rest % d
                    rest //= d
                    for k in range(width):
                        if positions[k] == j and not rule_allowed[r, offsets[features[j]] + v]:
                            hit = False
                if hit:
                    out[set_offsets[s] + local] = True


def excluded_combinations(plan: CombinationPlan, rule_features: np.ndarray, rule_values: np.ndarray) -> np.ndarray:
    """``(C,)`` bool: the combinations that contain an excluded combination.

    Rule r holds features ``rule_features[r]`` ((R, k) int32, padded with -1) and, per value
    (:func:`value_offsets`), whether it matches (``rule_values`` (R, V) bool); a combination matches a
    rule when the set holds all the rule's features and each of their values matches.
    """
    out = np.zeros(plan.n_combinations, np.bool_)
    if rule_features.shape[0]:
        _excluded_kernel(plan.sets, plan.set_offsets, plan.domains, value_offsets(plan.domains),
                         np.ascontiguousarray(rule_features, dtype=np.int32),
                         np.ascontiguousarray(rule_values, dtype=np.bool_), out)
    return out


@njit(cache=True, parallel=True)
def _implied_kernel(index, sets, set_offsets, domains, drop_set, lower_offsets, lower_flag, out):
    t = sets.shape[1]
    for i in prange(index.shape[0]):
        s = np.searchsorted(set_offsets, index[i], side="right") - 1
        features = sets[s]
        digits = np.empty(t, np.int64)
        rest = index[i] - set_offsets[s]
        for j in range(t - 1, -1, -1):
            d = domains[features[j]]
            digits[j] = rest % d
            rest //= d
        for drop in range(t):
            lower_index = 0
            for j in range(t):
                if j != drop:
                    lower_index = lower_index * domains[features[j]] + digits[j]
            if lower_flag[lower_offsets[drop_set[s, drop]] + lower_index]:
                out[i] = True
                break


def flagged_below(plan: CombinationPlan, lower: CombinationPlan, index: np.ndarray,
                  lower_flag: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: whether a (t − 1)-sub-combination of each combination ``index`` (N,) of ``plan`` is
    flagged in ``lower_flag`` (C',) bool over ``lower`` (e.g. already thin one level below)."""
    out = np.zeros(len(index), np.bool_)
    if len(index):
        _implied_kernel(np.ascontiguousarray(index, dtype=np.int64), plan.sets, plan.set_offsets, plan.domains,
                        lower_sets(plan, lower), lower.set_offsets, np.ascontiguousarray(lower_flag, dtype=np.bool_),
                        out)
    return out
