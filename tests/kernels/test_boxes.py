
import numpy as np
import pytest

from clipengine.kernels.boxes import box_iou, match_greedy


def iou_by_pixels(a, b):
    """Reference IoU for integer boxes: count covered unit cells on a grid."""
    size = int(max(a[2], a[3], b[2], b[3])) + 1
    grid_a = np.zeros((size, size), bool)
    grid_b = np.zeros((size, size), bool)
    grid_a[int(a[1]):int(a[3]), int(a[0]):int(a[2])] = True
    grid_b[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
    union = (grid_a | grid_b).sum()
    return (grid_a & grid_b).sum() / union if union else 0.0


def match_reference(truth, dets, scores, threshold):
    """Plain-Python greedy matching: detections by score (stable), best free truth by IoU."""
    matched = [-1] * len(truth)
    taken = set()
    for d in sorted(range(len(dets)), key=lambda i: (-scores[i], i)):
        best, best_iou = None, -1.0
        for t in range(len(truth)):
            if t in taken:
                continue
            value = iou_by_pixels(dets[d], truth[t])
            if value > best_iou:
                best, best_iou = t, value
        if best is not None and best_iou >= threshold:
            matched[best] = d
            taken.add(best)
    return matched


def random_boxes(rng, n, size=24):
    x0 = rng.integers(0, size - 1, n)
    y0 = rng.integers(0, size - 1, n)
    x1 = x0 + rng.integers(0, 8, n)  # width 0 allowed: degenerate boxes
    y1 = y0 + rng.integers(0, 8, n)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)


def test_iou_matches_pixel_counting_on_random_integer_boxes():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 40), random_boxes(rng, 30)
    got = box_iou(a, b)
    expected = np.array([[iou_by_pixels(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_iou_edge_cases():
    square = [0, 0, 10, 10]
    assert box_iou([square], [square])[0, 0] == 1.0
    assert box_iou([square], [[10, 0, 20, 10]])[0, 0] == 0.0  # touching edges
    assert box_iou([square], [[5, 5, 5, 9]])[0, 0] == 0.0  # zero width
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 0.0  # degenerate with itself
    assert box_iou([square], [[0, 0, 10, 5]])[0, 0] == pytest.approx(0.5)  # exactly the threshold
    assert box_iou(np.zeros((0, 4)), [square]).shape == (0, 1)


@pytest.mark.parametrize("seed", range(25))
def test_greedy_matching_agrees_with_reference(seed):
    rng = np.random.default_rng(seed)
    truth = random_boxes(rng, int(rng.integers(0, 7)), size=14)
    dets = random_boxes(rng, int(rng.integers(0, 7)), size=14)
    scores = rng.choice([0.2, 0.5, 0.9], len(dets))  # ties on purpose
    threshold = float(rng.choice([0.3, 0.5, 0.7]))
    got = match_greedy(truth, dets, scores, iou_threshold=threshold)
    assert got.tolist() == match_reference(truth, dets, scores, threshold)


def test_greedy_takes_the_best_score_first():
    truth = [[0, 0, 10, 10], [2, 0, 12, 10]]
    # the 0.9 detection overlaps both equally and takes the first (lower index); the 0.2 one then
    # takes the second (IoU 0.67) although it fits the first perfectly; the 0.1 one is left over
    dets = [[2, 0, 12, 10], [0, 0, 10, 10], [1, 0, 11, 10]]
    scores = [0.1, 0.2, 0.9]
    matched = match_greedy(truth, dets, scores, iou_threshold=0.5)
    iou = box_iou([[1, 0, 11, 10]], truth)[0]
    assert iou[0] == iou[1]  # a tie: the lower truth index wins
    assert matched.tolist() == [2, 1]


def test_threshold_is_inclusive_and_unmatched_is_minus_one():
    truth = [[0, 0, 10, 10], [50, 50, 60, 60]]
    dets = [[0, 0, 10, 5]]  # IoU exactly 0.5 with the first
    assert match_greedy(truth, dets, [1.0], iou_threshold=0.5).tolist() == [0, -1]
    assert match_greedy(truth, dets, [1.0], iou_threshold=0.51).tolist() == [-1, -1]
    assert match_greedy(truth, np.zeros((0, 4)), [], iou_threshold=0.5).tolist() == [-1, -1]
    with pytest.raises(ValueError):
        match_greedy(truth, dets, [1.0, 2.0])


def test_one_detection_matches_at_most_one_truth_and_vice_versa():
    rng = np.random.default_rng(7)
    for _ in range(20):
        truth, dets = random_boxes(rng, 6, 10), random_boxes(rng, 6, 10)
        matched = match_greedy(truth, dets, rng.random(6), iou_threshold=0.1)
        used = [m for m in matched if m >= 0]
        assert len(used) == len(set(used))
        for t, d in enumerate(matched):
            if d >= 0:
                assert box_iou([dets[d]], [truth[t]])[0, 0] >= 0.1


def test_kernel_module_does_not_import_the_engine():
    import ast
    import inspect

    import clipengine.kernels.boxes as module

    tree = ast.parse(inspect.getsource(module))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("clipengine") and not n.startswith("clipengine.kernels")]
