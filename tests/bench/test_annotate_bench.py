"""bench/annotate.py's own pieces: its NumPy references agree with plain computations, and its CLIP-like
embeddings have the anisotropy they are said to have."""

import numpy as np
import pytest

from clipengine.bench import annotate as bench


def _unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mean_pairwise_cosine_is_the_mean_over_pairs():
    rows = _unit(np.random.default_rng(0), (50, 8))
    gram = rows.astype(np.float64) @ rows.T.astype(np.float64)
    explicit = (gram.sum() - np.trace(gram)) / (50 * 49)
    assert bench.mean_pairwise_cosine(rows) == pytest.approx(explicit, abs=1e-9)


@pytest.mark.parametrize("target", [0.4, 0.6])
def test_clip_like_rows_reach_the_stated_mean_cosine_and_are_anisotropic(target):
    generator = bench.ClipLikeEmbeddings(64, seed=0, clusters=50)
    generator.calibrate(target, sample_rows=1024)
    rows = generator.sample(4000, seed=1)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert bench.mean_pairwise_cosine(rows) == pytest.approx(target, abs=0.02)
    centred = rows - rows.mean(axis=0)
    spectrum = np.linalg.svd(centred, compute_uv=False) ** 2
    assert spectrum[0] / spectrum[len(spectrum) // 2] > 5  # isotropic rows give about 1
    assert abs(bench.mean_pairwise_cosine(bench.isotropic(4000, 64, seed=1))) < 0.01


@pytest.mark.parametrize("strategy", ["mean", "max"])
def test_both_numpy_labelling_references_agree_with_clipengines_kernel(strategy):
    from clipengine.annotate.class_embeddings import build_class_side
    from clipengine.annotate.schemas import load_schema
    from clipengine.kernels.similarity import label_segments

    rng = np.random.default_rng(1)
    schema = load_schema("celeba").with_strategy(strategy)
    side = build_class_side(schema, _unit(rng, (len(schema.prompts()), 32)))
    rows = _unit(rng, (3000, 32))
    want = label_segments(rows, side.matrix, side.prompt_offsets, side.class_offsets, 100.0, reduce=side.reduce,
                          top_m=side.top_m)
    for reference in (bench.reference_labels_tuned, bench.reference_labels_plain):
        labels, probs, margins = (reference(rows, side, 100.0, block_rows=700) if reference is bench.reference_labels_tuned
                                  else reference(rows, side, 100.0))
        decided = want[2] > 1e-4
        np.testing.assert_array_equal(labels[decided], want[0][decided])
        np.testing.assert_allclose(probs, want[1], atol=1e-4)  # float32 logits × 100, summed in other orders
        np.testing.assert_allclose(margins, want[2], atol=1e-4)


def test_numpy_topk_references_are_brute_force():
    rng = np.random.default_rng(2)
    rows = _unit(rng, (5000, 16))
    rows[10] = rows[20]  # a tie: the lower row first
    queries = np.stack([rows[20], _unit(rng, (16,))])
    scores = queries @ rows.T
    want = np.stack([np.lexsort((np.arange(5000), -row))[:7] for row in scores])
    index, score = bench.reference_topk(rows, queries[0], 7)
    np.testing.assert_array_equal(index, want[0])
    np.testing.assert_allclose(score, scores[0, want[0]], atol=1e-6)  # GEMV and GEMM round differently
    batch_index, batch_score = bench.reference_topk_batch(rows, queries, 7)
    np.testing.assert_array_equal(batch_index, want)
    np.testing.assert_allclose(batch_score, np.take_along_axis(scores, want, axis=1), atol=1e-6)


def test_the_tuned_binary_shortcut_agrees_with_the_kernel():
    """Every attribute binary (softmax of a pair as one sigmoid): the tuned reference's fast branch."""
    from clipengine.annotate.class_embeddings import ClassSide
    from clipengine.kernels.similarity import label_segments

    rng = np.random.default_rng(3)
    n_attributes = 9
    side = ClassSide(matrix=_unit(rng, (2 * n_attributes, 24)), prompt_offsets=np.arange(2 * n_attributes + 1),
                     class_offsets=np.arange(0, 2 * n_attributes + 1, 2),
                     reduce=np.zeros(2 * n_attributes, np.int8), top_m=np.ones(2 * n_attributes, np.int32))
    rows = _unit(rng, (2000, 24))
    want = label_segments(rows, side.matrix, side.prompt_offsets, side.class_offsets, 100.0)
    labels, probs, margins = bench.reference_labels_tuned(rows, side, 100.0, block_rows=300)
    decided = want[2] > 1e-4
    np.testing.assert_array_equal(labels[decided], want[0][decided])
    np.testing.assert_allclose(probs, want[1], atol=1e-4)
    np.testing.assert_allclose(margins, want[2], atol=1e-4)
