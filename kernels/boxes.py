"""Axis-aligned box geometry: IoU matrices and greedy detection-to-ground-truth matching.

Boxes are ``[x0, y0, x1, y1]`` in pixels with continuous coordinates (area = (x1-x0)·(y1-y0),
as KITTI's and COCO's evaluators compute it). Degenerate boxes (x1 ≤ x0 or y1 ≤ y0) have
area 0 and IoU 0 with everything, themselves included.
"""

from __future__ import annotations

import numpy as np


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair.

    boxes_a: (N, 4) float, boxes_b: (M, 4) float → (N, M) float64 in [0, 1].
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])  # (N, M)
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def match_greedy(
    truth_boxes: np.ndarray,
    detection_boxes: np.ndarray,
    detection_scores: np.ndarray,
    *,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Match detections to ground-truth boxes greedily by descending score.

    Each detection, best score first (ties: lower index first), takes the still unmatched
    ground-truth box with the highest IoU (ties: lower index) if that IoU is ≥ ``iou_threshold``;
    otherwise it is a false positive and matches nothing.

    truth_boxes: (N, 4), detection_boxes: (M, 4), detection_scores: (M,)
    → (N,) int64: the index of the detection matched to each ground-truth box, or -1.
    """
    truth = np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4)
    detections = np.asarray(detection_boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detection_scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != detections.shape[0]:
        raise ValueError(f"{detections.shape[0]} detection boxes but {scores.shape[0]} scores")
    matched = np.full(truth.shape[0], -1, dtype=np.int64)
    if truth.shape[0] == 0 or detections.shape[0] == 0:
        return matched
    iou = box_iou(detections, truth)  # (M, N)
    order = np.argsort(-scores, kind="stable")
    free = np.ones(truth.shape[0], dtype=bool)
    for d in order:
        candidates = np.where(free, iou[d], -1.0)  # taken boxes can never win
        best = int(np.argmax(candidates))
        if candidates[best] >= iou_threshold and free[best]:
            matched[best] = d
            free[best] = False
    return matched
