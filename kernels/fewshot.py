"""Few-shot adaptation of a zero-shot classifier, training-free: closed-form fits on a few labelled
image embeddings, and one pass that labels every stored embedding with the adapted classifiers.

Per attribute with C classes, every classifier here has the form

    logits(x) = w_zs · zs(x) + α · adapter(x)        x: (D,) L2-normalized image embedding

where ``zs(x)`` is the schema's zero-shot class logit (scale t times the prompt cosines, reduced per
class as the schema's strategy says) and ``adapter`` one of

- **prototype**: ``t · x·p_c`` with ``p_c`` the normalized mean of the labelled embeddings of class c
  (blended with the text prototypes through ``w_zs``);
- **gda** (Wang et al., ICLR 2024): Gaussian discriminant analysis with one shared covariance,
  shrunk as they do, ``Σ⁻¹ ≈ D·((n − 1)·S + tr(S)·I)⁻¹``; ``adapter(x) = x·W_cᵀ + b_c`` with
  ``W_c = Σ⁻¹μ_c``, ``b_c = log π_c − ½ μ_cᵀΣ⁻¹μ_c``; solved through the n × n Woodbury form
  when there are fewer labels than dimensions;
- **tip** (Tip-Adapter, Zhang et al., ECCV 2022): a cache of the labelled embeddings,
  ``adapter(x)_c = Σ_{labelled i of class c} exp(−β(1 − x·k_i))``.

A class without a labelled item gets the mean of the labelled classes' adapter logits (so the
adapter neither favours nor penalizes it; only the zero-shot part places it).

The labelling pass (:func:`label_adapted`) takes one flat layout for all attributes (adapted or
not), see :class:`AdaptedSide`; the small NumPy functions (fits, :func:`zero_shot_logits`,
:func:`adapted_logits_reference`) are what cross-validation uses on the labelled rows and what the
pass is tested against. This module never imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from clipengine.kernels.similarity import (  # one owner of the reduce codes and of the softmax top-2
    MAX_TOP_M,
    REDUCE_LOGSUMEXP,
    REDUCE_MAX,
    REDUCE_MEAN,
    _softmax_top2,
)

CHUNK_BYTES = 128 * 2**20  # scratch per chunk: the (rows, R) similarity block plus a float32 copy of the rows
MIN_CHUNK_ROWS = 1_024
MAX_CHUNK_ROWS = 262_144
_ROWS_PER_TASK = 64


# ---- zero-shot class logits (NumPy; the labelled rows only) -------------------------------------
def zero_shot_logits(features: np.ndarray, prompt_matrix: np.ndarray, prompt_offsets: np.ndarray,
                     reduce: np.ndarray, top_m: np.ndarray, scale: float) -> np.ndarray:
    """(n, C) float64 class logits of (n, D) ``features`` against (P, D) ``prompt_matrix`` whose class
    c owns rows ``prompt_offsets[c]:prompt_offsets[c+1]`` reduced by ``reduce[c]`` (``top_m[c]``)."""
    sims = np.asarray(features, np.float64) @ np.asarray(prompt_matrix, np.float64).T  # (n, P)
    n_classes = len(prompt_offsets) - 1
    out = np.empty((sims.shape[0], n_classes))
    for c in range(n_classes):
        block = sims[:, prompt_offsets[c]:prompt_offsets[c + 1]]
        code = int(reduce[c])
        if code == REDUCE_MAX:
            out[:, c] = scale * block.max(axis=1)
        elif code == REDUCE_MEAN:
            out[:, c] = scale * block.mean(axis=1)
        elif code == REDUCE_LOGSUMEXP:
            top = block.max(axis=1, keepdims=True)
            out[:, c] = scale * top[:, 0] + np.log(np.exp(scale * (block - top)).mean(axis=1))
        else:
            keep = min(int(top_m[c]), block.shape[1])
            out[:, c] = scale * np.sort(block, axis=1)[:, ::-1][:, :keep].mean(axis=1)
    return out


# ---- fits (closed form) ---------------------------------------------------------------------------
def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), n_classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def _normalized_weights(labels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    return w / w.sum()


def fit_prototypes(features: np.ndarray, labels: np.ndarray, n_classes: int,
                   weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) float64 unit class prototypes (weighted means of ``features`` (n, D) per class of
    ``labels`` (n,) int) and (C,) bool: which classes have a labelled item (others' rows are zero)."""
    x = np.asarray(features, np.float64)
    w = _normalized_weights(labels, weights)
    sums = _one_hot(labels, n_classes).T @ (x * w[:, None])  # (C, D)
    has = np.bincount(labels, minlength=n_classes) > 0
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), 0.0), has


def fit_gda(features: np.ndarray, labels: np.ndarray, n_classes: int,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GDA with one shared, shrunk covariance: ``W`` (C, D), ``b`` (C,) float64 and (C,) bool ``has``.

    Weighted class means μ_c and within-class scatter S (weights: inverse inclusion probabilities);
    ``Σ⁻¹ = D·((n − 1)·S + tr(S)·I)⁻¹`` (Wang et al.'s empirical-Bayes shrinkage); class priors are the
    weighted class shares with one pseudo-item per class. Rows of classes without labels are zero."""
    x = np.asarray(features, np.float64)
    n, d = x.shape
    w = _normalized_weights(labels, weights)
    one_hot = _one_hot(labels, n_classes)  # (n, C)
    counts = w @ one_hot
    has = np.bincount(labels, minlength=n_classes) > 0
    means = one_hot.T @ (x * w[:, None])
    means[has] /= counts[has, None]
    residuals = (x - means[labels]) * np.sqrt(w)[:, None]  # (n, D): S = RᵀR
    trace = float(np.sum(residuals * residuals))
    c1, c2 = max(n - 1, 0), max(trace, 1e-6)
    mu = means[has]
    if n < d:
        # (c1·RᵀR + c2·I)⁻¹ = (I − Rᵀ(c2/c1·I + RRᵀ)⁻¹R)/c2, an n × n solve
        projected = mu @ residuals.T  # (C', n)
        if c1 > 0:
            gram = residuals @ residuals.T + (c2 / c1) * np.eye(n)
            solved = np.linalg.solve(gram, projected.T).T  # (C', n)
            weights_has = d * (mu - solved @ residuals) / c2
        else:
            weights_has = d * mu / c2
    else:
        covariance = c1 * (residuals.T @ residuals) + c2 * np.eye(d)
        weights_has = d * np.linalg.solve(covariance, mu.T).T
    prior = np.log((counts[has] * n + 1.0) / (n + n_classes))
    bias_has = prior - 0.5 * np.sum(weights_has * mu, axis=1)
    weight_rows = np.zeros((n_classes, d))
    bias = np.zeros(n_classes)
    weight_rows[has] = weights_has
    bias[has] = bias_has
    return weight_rows, bias, has


def fill_unlabelled(logits: np.ndarray, has: np.ndarray) -> np.ndarray:
    """(n, C) adapter logits with the columns of classes without labels set to the mean of the
    labelled classes' columns (a linear map, so it folds into weights, biases and cache values)."""
    if has.all() or not has.any():
        return logits
    out = logits.copy()
    out[:, ~has] = logits[:, has].mean(axis=1, keepdims=True)
    return out


def fill_matrix(has: np.ndarray) -> np.ndarray:
    """(C, C) float64 M with ``fill_unlabelled(L, has) == L @ M`` for any L."""
    n_classes = len(has)
    matrix = np.eye(n_classes)
    if has.all() or not has.any():
        return matrix
    matrix[:, ~has] = 0.0
    matrix[np.ix_(has, ~has)] = 1.0 / has.sum()
    return matrix


def prototype_logits(features: np.ndarray, prototypes: np.ndarray, has: np.ndarray, scale: float) -> np.ndarray:
    """(n, C) ``scale · x·p_c`` (unlabelled classes: the mean of the labelled ones)."""
    return fill_unlabelled(scale * (np.asarray(features, np.float64) @ prototypes.T), has)


def gda_logits(features: np.ndarray, weight_rows: np.ndarray, bias: np.ndarray, has: np.ndarray) -> np.ndarray:
    """(n, C) ``x·W_cᵀ + b_c`` (unlabelled classes: the mean of the labelled ones)."""
    return fill_unlabelled(np.asarray(features, np.float64) @ weight_rows.T + bias, has)


def tip_values(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C) float64 cache values: one-hot labels, unlabelled classes getting the labelled mean."""
    has = np.bincount(labels, minlength=n_classes) > 0
    return _one_hot(labels, n_classes) @ fill_matrix(has)


def tip_logits(features: np.ndarray, cache: np.ndarray, values: np.ndarray, beta: float) -> np.ndarray:
    """(n, C) ``Σ_i exp(−β(1 − x·k_i)) · values_i`` over the (K, D) ``cache`` and its (K, C) values."""
    affinity = np.exp(-beta * (1.0 - np.asarray(features, np.float64) @ np.asarray(cache, np.float64).T))
    return affinity @ values


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """(n,) int64 fold of each item: each class's items shuffled (``seed``) and dealt round-robin,
    continuing where the previous class stopped, so folds differ in size by at most one."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int64)
    position = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        folds[members] = (position + np.arange(len(members))) % n_folds
        position += len(members)
    return folds


# ---- the labelling pass ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptedSide:
    """Every attribute's classifier in one flat layout (C classes over A attributes; K cache rows):

    - ``matrix`` (L + P + K, D) float32: L linear rows (zero-shot folded in where the strategy is
      linear, plus α·adapter for prototype/gda), then P prompt rows (zero-shot with a non-linear
      per-class reduction), then K cache rows (tip);
    - ``linear_index`` (C,) int64: class c's linear row, or −1 for a class whose linear part is zero
      (softmax is shift-invariant: an attribute's first class can be subtracted from all of its
      classes, which leaves a binary attribute one row instead of two);
    - ``bias`` (C,) float32; ``class_offsets`` (A + 1,) int64;
    - ``prompt_offsets`` (C + 1,) int64 into the P prompt rows (an empty range: no prompt part);
      ``reduce`` (C,) int8, ``top_m`` (C,) int32, ``zs_weight`` (C,) float32 (multiplies the reduced
      prompt logit), ``scale`` (CLIP's logit scale);
    - ``cache_betas`` (G,) float32 and ``cache_values`` (G, K, L) float32 (α folded in): linear row l gains
      ``Σ_k exp(β_g(s_k − 1)) · values[g, k, l]`` for each group g.
    """

    matrix: np.ndarray
    linear_index: np.ndarray
    bias: np.ndarray
    class_offsets: np.ndarray
    prompt_offsets: np.ndarray
    reduce: np.ndarray
    top_m: np.ndarray
    zs_weight: np.ndarray
    scale: float
    cache_betas: np.ndarray
    cache_values: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.bias.shape[0])

    @property
    def n_linear_rows(self) -> int:
        return int((self.linear_index >= 0).sum())

    @property
    def n_prompt_rows(self) -> int:
        return int(self.prompt_offsets[-1])

    @property
    def n_cache_rows(self) -> int:
        return int(self.cache_values.shape[1]) if self.cache_values.ndim == 3 else 0


def check_side(side: AdaptedSide, dim: int) -> None:
    c, k, n_linear = side.n_classes, side.n_cache_rows, side.n_linear_rows
    if side.matrix.dtype != np.float32 or side.matrix.shape != (n_linear + side.n_prompt_rows + k, dim):
        raise ValueError(f"matrix must be ({n_linear} + {side.n_prompt_rows} + {k}, {dim}) float32, got "
                         f"{side.matrix.shape} {side.matrix.dtype}")
    used = side.linear_index[side.linear_index >= 0]
    if side.linear_index.shape != (c,) or not np.array_equal(np.sort(used), np.arange(n_linear)):
        raise ValueError("linear_index must be (C,), each linear row once, −1 for none")
    if side.class_offsets[0] != 0 or side.class_offsets[-1] != c or np.any(np.diff(side.class_offsets) < 1):
        raise ValueError("class_offsets must run from 0 to the number of classes, each attribute one class or more")
    if side.prompt_offsets.shape != (c + 1,) or side.prompt_offsets[0] != 0 or np.any(np.diff(side.prompt_offsets) < 0):
        raise ValueError("prompt_offsets must be (C + 1,) non-decreasing from 0")
    if side.top_m.min(initial=1) < 1 or side.top_m.max(initial=1) > MAX_TOP_M:
        raise ValueError(f"top_m must be within 1..{MAX_TOP_M}")
    if side.cache_values.ndim != 3 or side.cache_values.shape[0] != side.cache_betas.shape[0] \
            or side.cache_values.shape[2] != n_linear:
        raise ValueError("cache_values must be (G, K, L) with one beta per group")


def auto_chunk_rows(embeddings: np.ndarray, n_columns: int) -> int:
    copies = embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous
    per_row = 4 * (n_columns + (embeddings.shape[1] if copies else 0))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, per_row))))


def label_adapted(embeddings: np.ndarray, side: AdaptedSide, *, chunk_rows: int | None = None,
                  on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label (N, D) float ``embeddings`` (may be a memmap) with every attribute of ``side``.

    Returns ``labels`` (N, A) int32, ``probs`` and ``margins`` (N, A) float32, as
    ``clipengine.kernels.similarity.label_segments`` does (argmax, its softmax probability, its lead
    over the runner-up). Streamed in chunks: one float32 GEMM against ``side.matrix``, the cache's
    exponentials and their GEMM with the values, then one Numba pass (per-class reduction, softmax).
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got {embeddings.shape}")
    check_side(side, embeddings.shape[1])
    n, n_attributes = embeddings.shape[0], side.class_offsets.shape[0] - 1
    labels = np.empty((n, n_attributes), np.int32)
    probs = np.empty((n, n_attributes), np.float32)
    margins = np.empty((n, n_attributes), np.float32)
    if n == 0:
        return labels, probs, margins
    n_linear, p, k = side.n_linear_rows, side.n_prompt_rows, side.n_cache_rows
    rows = min(n, chunk_rows or auto_chunk_rows(embeddings, side.matrix.shape[0]))
    transposed = np.ascontiguousarray(side.matrix.T)  # (D, R)
    sims = np.empty((rows, side.matrix.shape[0]), np.float32)
    affinity = np.empty((rows, k), np.float32)
    cache_sum = np.empty((rows, n_linear), np.float32)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        r = stop - start
        block = np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)  # (r, D)
        out = sims[:r]
        np.matmul(block, transposed, out=out)  # (r, L + P + K)
        linear = out[:, :n_linear]
        for g in range(side.cache_betas.shape[0]):
            _affinity(out[:, n_linear + p:], np.float32(side.cache_betas[g]), affinity[:r])
            np.matmul(affinity[:r], side.cache_values[g], out=cache_sum[:r])
            linear += cache_sum[:r]
        _finish_rows(out, side.linear_index, side.bias, n_linear, side.class_offsets, side.prompt_offsets,
                     side.reduce, side.top_m, side.zs_weight, np.float64(side.scale), labels[start:stop],
                     probs[start:stop], margins[start:stop])
        if on_chunk is not None:
            on_chunk(r)
    return labels, probs, margins


@njit(parallel=True, cache=True, fastmath=True)
def _affinity(sims, beta, out):
    """``out = exp(β(s − 1))`` of the (r, K) cache similarities."""
    n, k = sims.shape
    for i in prange(n):
        for j in range(k):
            out[i, j] = np.exp(beta * (sims[i, j] - 1.0))


@njit(cache=True, inline="always")
def _reduce(row, p0, p1, code, m, scale, scratch):
    count = p1 - p0
    if code == REDUCE_MAX:
        best = row[p0]
        for j in range(p0 + 1, p1):
            best = max(best, row[j])
        return scale * best
    if code == REDUCE_MEAN:
        total = 0.0
        for j in range(p0, p1):
            total += row[j]
        return scale * total / count
    if code == REDUCE_LOGSUMEXP:
        top = row[p0]
        for j in range(p0 + 1, p1):
            top = max(top, row[j])
        total = 0.0
        for j in range(p0, p1):
            total += np.exp(scale * (row[j] - top))
        return scale * top + np.log(total / count)
    keep = min(m, count)  # the m largest, kept in a small descending buffer
    filled = 0
    for j in range(p0, p1):
        value = row[j]
        if filled < keep:
            at = filled
            filled += 1
        elif value > scratch[keep - 1]:
            at = keep - 1
        else:
            continue
        while at > 0 and scratch[at - 1] < value:
            scratch[at] = scratch[at - 1]
            at -= 1
        scratch[at] = value
    total = 0.0
    for j in range(keep):
        total += scratch[j]
    return scale * total / keep


@njit(parallel=True, cache=True)
def _finish_rows(sims, linear_index, bias, n_linear, class_offsets, prompt_offsets, reduce, top_m, zs_weight, scale,
                 labels, probs, margins):
    """Per row: class logit = its linear column (if any) + bias + zs_weight · reduced prompt logit; softmax top-2."""
    n = sims.shape[0]
    n_attributes = class_offsets.shape[0] - 1
    max_classes = max(1, np.max(np.diff(class_offsets)))
    n_tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        scratch = np.empty(MAX_TOP_M, np.float64)
        logits = np.empty(max_classes, np.float64)
        for i in range(task * _ROWS_PER_TASK, min(n, (task + 1) * _ROWS_PER_TASK)):
            row = sims[i]
            for a in range(n_attributes):
                c0 = class_offsets[a]
                count = class_offsets[a + 1] - c0
                for j in range(count):
                    cls = c0 + j
                    value = bias[cls]
                    if linear_index[cls] >= 0:
                        value += row[linear_index[cls]]
                    p0 = prompt_offsets[cls]
                    p1 = prompt_offsets[cls + 1]
                    if p1 > p0:
                        value += zs_weight[cls] * _reduce(row, n_linear + p0, n_linear + p1, reduce[cls],
                                                          top_m[cls], scale, scratch)
                    logits[j] = value
                labels[i, a], probs[i, a], margins[i, a] = _softmax_top2(logits, count)


def adapted_logits_reference(embeddings: np.ndarray, side: AdaptedSide) -> np.ndarray:
    """(N, C) float64 class logits of :func:`label_adapted`, in plain NumPy (the whole matrix at once)."""
    x = np.asarray(embeddings, np.float64)
    c, n_linear, p = side.n_classes, side.n_linear_rows, side.n_prompt_rows
    matrix = side.matrix.astype(np.float64)
    expand = np.zeros((n_linear, c))  # linear rows → classes
    has_row = side.linear_index >= 0
    expand[side.linear_index[has_row], np.flatnonzero(has_row)] = 1.0
    logits = x @ matrix[:n_linear].T @ expand + side.bias
    prompts = matrix[n_linear:n_linear + p]
    for cls in range(c):
        p0, p1 = side.prompt_offsets[cls], side.prompt_offsets[cls + 1]
        if p1 > p0:
            one = zero_shot_logits(x, prompts[p0:p1], np.array([0, p1 - p0]), side.reduce[cls:cls + 1],
                                   side.top_m[cls:cls + 1], side.scale)
            logits[:, cls] += side.zs_weight[cls] * one[:, 0]
    for g in range(side.cache_betas.shape[0]):
        values = side.cache_values[g].astype(np.float64) @ expand
        logits += tip_logits(x, matrix[n_linear + p:], values, float(side.cache_betas[g]))
    return logits


def softmax_top2_reference(logits: np.ndarray, class_offsets: np.ndarray):
    """(labels, probs, margins) (N, A) of (N, C) class logits, per attribute, in NumPy."""
    n, n_attributes = logits.shape[0], len(class_offsets) - 1
    labels = np.empty((n, n_attributes), np.int32)
    probs = np.empty((n, n_attributes), np.float32)
    margins = np.empty((n, n_attributes), np.float32)
    for a in range(n_attributes):
        block = logits[:, class_offsets[a]:class_offsets[a + 1]]
        e = np.exp(block - block.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        labels[:, a] = block.argmax(axis=1)
        top = np.sort(e, axis=1)[:, ::-1]
        probs[:, a] = top[:, 0]
        margins[:, a] = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    return labels, probs, margins
