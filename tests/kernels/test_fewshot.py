"""Few-shot kernels against plain NumPy: the closed-form fits, the labelling pass, the zero-shot reduction."""

from __future__ import annotations

import numpy as np
import pytest

from clipengine.kernels import fewshot
from clipengine.kernels.similarity import REDUCE_LOGSUMEXP, REDUCE_MAX, REDUCE_MEAN, REDUCE_TOPM, label_segments


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_gda_fit_in_woodbury_form_equals_the_direct_shrunk_inverse():
    rng = np.random.default_rng(0)
    for n, d in ((12, 40), (60, 8)):  # fewer labels than dimensions (Woodbury), and more
        x = unit_rows(rng, n, d)
        y = np.arange(n) % 3
        w = rng.uniform(1, 5, n)
        weights, bias, has = fewshot.fit_gda(x, y, 3, w)
        # the definition, written out: weighted means, weighted scatter, D·((n−1)S + tr(S)I)⁻¹
        p = w / w.sum()
        means = np.stack([(p[y == c, None] * x[y == c]).sum(0) / p[y == c].sum() for c in range(3)])
        r = x - means[y]
        scatter = (p[:, None] * r).T @ r
        precision = d * np.linalg.inv((n - 1) * scatter + np.trace(scatter) * np.eye(d))
        shares = np.array([p[y == c].sum() for c in range(3)])
        np.testing.assert_allclose(weights, means @ precision, rtol=1e-8, atol=1e-8)
        want_bias = np.log((shares * n + 1) / (n + 3)) - 0.5 * np.einsum("cd,de,ce->c", means, precision, means)
        np.testing.assert_allclose(bias, want_bias, rtol=1e-8, atol=1e-8)
        assert has.all()


def test_prototypes_are_normalized_weighted_class_means_and_unlabelled_classes_get_the_labelled_mean():
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 6, 5)
    y = np.array([0, 0, 2, 2, 2, 0])
    w = np.array([1.0, 3.0, 1.0, 1.0, 2.0, 1.0])
    prototypes, has = fewshot.fit_prototypes(x, y, 3, w)
    for c in (0, 2):
        mean = (w[y == c, None] * x[y == c]).sum(0)
        np.testing.assert_allclose(prototypes[c], mean / np.linalg.norm(mean), rtol=1e-12)
    assert has.tolist() == [True, False, True] and not prototypes[1].any()
    logits = fewshot.prototype_logits(x, prototypes, has, 10.0)
    np.testing.assert_allclose(logits[:, 1], (logits[:, 0] + logits[:, 2]) / 2)
    raw = rng.standard_normal((4, 3))
    np.testing.assert_allclose(fewshot.fill_unlabelled(raw, has), raw @ fewshot.fill_matrix(has))


def test_tip_logits_sum_the_cache_affinities_per_class():
    rng = np.random.default_rng(2)
    cache, x = unit_rows(rng, 5, 4), unit_rows(rng, 3, 4)
    labels = np.array([0, 1, 1, 0, 1])
    values = fewshot.tip_values(labels, 3)
    got = fewshot.tip_logits(x, cache, values, 5.5)
    for i in range(3):
        for c in (0, 1):
            want = sum(np.exp(-5.5 * (1 - x[i] @ cache[k])) for k in range(5) if labels[k] == c)
            assert got[i, c] == pytest.approx(want, rel=1e-12)
        assert got[i, 2] == pytest.approx((got[i, 0] + got[i, 1]) / 2, rel=1e-12)  # class 2 has no label


def test_stratified_folds_spread_every_class_and_balance_fold_sizes():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    folds = fewshot.stratified_folds(labels, 5, seed=3)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(folds, fewshot.stratified_folds(labels, 5, seed=3))


@pytest.mark.parametrize("reduce_code", [REDUCE_MAX, REDUCE_MEAN, REDUCE_LOGSUMEXP, REDUCE_TOPM])
def test_zero_shot_logits_agree_with_the_labelling_kernel(reduce_code):
    rng = np.random.default_rng(4)
    x = unit_rows(rng, 50, 16).astype(np.float32)
    prompts = unit_rows(rng, 9, 16).astype(np.float32)
    prompt_offsets = np.array([0, 3, 4, 9])
    reduce = np.full(3, reduce_code, np.int8)
    top_m = np.full(3, 2, np.int32)
    logits = fewshot.zero_shot_logits(x, prompts, prompt_offsets, reduce, top_m, 30.0)
    labels, probs, margins = label_segments(x, prompts, prompt_offsets, np.array([0, 3]), 30.0, reduce=reduce,
                                            top_m=top_m)
    want = fewshot.softmax_top2_reference(logits, np.array([0, 3]))
    assert np.array_equal(labels, want[0])
    np.testing.assert_allclose(probs, want[1], atol=2e-5)
    np.testing.assert_allclose(margins, want[2], atol=2e-5)


def random_side(rng, d=24, with_cache=True) -> fewshot.AdaptedSide:
    """Three attributes (3, 2 and 1 classes): linear rows (one class without), prompt rows of every
    reduction, two cache groups."""
    class_offsets = np.array([0, 3, 5, 6])
    n_classes = 6
    prompt_counts = [0, 3, 2, 0, 4, 1]  # classes 0 and 3: linear only
    prompt_offsets = np.concatenate([[0], np.cumsum(prompt_counts)])
    linear_index = np.array([2, 0, -1, 1, 4, 3])  # class 2 has no linear row; rows in any order
    k = 7 if with_cache else 0
    matrix = np.concatenate([rng.standard_normal((5, d)) * 3, unit_rows(rng, prompt_offsets[-1], d),
                             unit_rows(rng, k, d)]).astype(np.float32)
    groups = 2 if with_cache else 0
    return fewshot.AdaptedSide(
        matrix=matrix, linear_index=linear_index, bias=rng.standard_normal(n_classes).astype(np.float32),
        class_offsets=class_offsets,
        prompt_offsets=prompt_offsets.astype(np.int64),
        reduce=np.array([REDUCE_MAX, REDUCE_MEAN, REDUCE_LOGSUMEXP, REDUCE_MAX, REDUCE_TOPM, REDUCE_MAX], np.int8),
        top_m=np.array([1, 1, 1, 1, 3, 1], np.int32), zs_weight=np.array([1, 1, 0.5, 1, 2, 1], np.float32),
        scale=20.0, cache_betas=np.array([1.0, 5.5][:groups], np.float32),
        cache_values=rng.uniform(0, 2, (groups, k, 5)).astype(np.float32))


@pytest.mark.parametrize("with_cache", [True, False])
def test_label_adapted_equals_the_numpy_reference_chunk_by_chunk(with_cache, tmp_path):
    rng = np.random.default_rng(5)
    side = random_side(rng, with_cache=with_cache)
    x = unit_rows(rng, 1000, 24).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float16))
    stored = np.load(path, mmap_mode="r")  # float16 memmap: converted chunk by chunk
    seen = []
    labels, probs, margins = fewshot.label_adapted(stored, side, chunk_rows=96, on_chunk=seen.append)
    want = fewshot.softmax_top2_reference(fewshot.adapted_logits_reference(stored, side), side.class_offsets)
    assert sum(seen) == 1000 and len(seen) == 11
    decided = want[2] > 1e-4
    assert np.array_equal(labels[decided], want[0][decided])
    np.testing.assert_allclose(probs, want[1], atol=1e-4)
    np.testing.assert_allclose(margins, want[2], atol=1e-4)
    assert (labels[:, 2] == 0).all() and np.allclose(margins[:, 2], 1.0)  # a one-class attribute


def test_label_adapted_checks_the_layout():
    rng = np.random.default_rng(6)
    side = random_side(rng)
    with pytest.raises(ValueError, match="matrix must be"):
        fewshot.label_adapted(unit_rows(rng, 4, 23).astype(np.float32), side)
