"""CARLA camera exports in the KITTI object layout.

``ROOT/image_2/<frame>.png`` and ``ROOT/label_2/<frame>.txt``: one object per line,
15 space-separated fields ``type truncated occluded alpha x0 y0 x1 y1 h w l x y z rotation_y``.
The model's output (``--detections DIR``) has one ``<frame>.txt`` per frame in the same
format plus a 16th field, the score. Each ground-truth object of the chosen classes is an
item (its box crop is encoded); its error is 1 when no detection of its class matches it at
IoU ≥ the threshold (greedy by score), else 0.
"""

from __future__ import annotations

import math
from pathlib import Path

from clipengine.datasets.base import Dataset
from clipengine.encode.inputs import is_image_file
from clipengine.errors import ClipengineError

LABEL_FIELDS = 15
DETECTION_FIELDS = 16
OCCLUSION_LEVELS = {0: "fully visible", 1: "partly occluded", 2: "largely occluded", 3: "unknown"}


def parse_kitti_file(path: Path, *, with_score: bool) -> list[dict]:
    """The objects of one KITTI label (15 fields) or detection (16 fields) file.

    A line with another number of fields, or a field that is not a number where one is
    expected, raises a one-line ``ClipengineError`` naming the file and line.
    """
    expected = DETECTION_FIELDS if with_score else LABEL_FIELDS
    objects = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != expected:
                raise ClipengineError(
                    f"{path}:{number}: {len(fields)} fields, expected {expected} "
                    f"({'type truncated occluded alpha x0 y0 x1 y1 h w l x y z rotation_y' + (' score' if with_score else '')})"
                )
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise ClipengineError(f"{path}:{number}: a field after the type is not a number") from None
            objects.append(
                {
                    "line": number,
                    "type": fields[0],
                    "truncated": values[0],
                    "occluded": int(values[1]),
                    "alpha": values[2],
                    "box": values[3:7],
                    "dimensions": values[7:10],
                    "location": values[10:13],
                    "rotation_y": values[13],
                    "score": values[14] if with_score else None,
                }
            )
    return objects


class CarlaDataset(Dataset):
    name = "carla"
    default_schema = "pedestrian"
    summary = "KITTI-layout CARLA exports; items are ground-truth objects, error = missed detection"
    keys = ("path", "box")

    def __init__(self, root, config=None, *, progress=True):
        super().__init__(root, config, progress=progress)
        self.image_dir = self.root / "image_2"
        self.label_dir = self.root / "label_2"
        if not self.image_dir.is_dir():
            raise ClipengineError(f"{self.image_dir} does not exist (expected the KITTI layout ROOT/image_2, ROOT/label_2)")
        if not self.label_dir.is_dir():
            raise ClipengineError(f"{self.label_dir} does not exist (expected the KITTI layout ROOT/image_2, ROOT/label_2)")
        detections = self.config.detections
        if detections is None:
            raise ClipengineError("dataset 'carla' needs --detections DIR (the model's KITTI-format detections)")
        self.detection_dir = Path(detections).expanduser().resolve()
        if not self.detection_dir.is_dir():
            raise ClipengineError(f"detections folder {self.detection_dir} does not exist")
        if not self.config.classes:
            raise ClipengineError("dataset 'carla' needs at least one class (--classes)")
        if not 0.0 < self.config.iou_threshold <= 1.0:
            raise ClipengineError(f"--iou must be in (0, 1], got {self.config.iou_threshold}")
        self._frames = self._find_frames()
        self._objects: dict[str, list[dict]] | None = None

    def settings(self) -> dict:
        return {
            "classes": list(self.config.classes),
            "iou_threshold": self.config.iou_threshold,
            "detections": str(self.detection_dir),
            "limit": self.config.limit,
        }

    def error_features(self) -> list[str]:
        features = ["box_height", "box_width", "box_area", "truncated", "occluded", "distance"]
        return (["class"] if len(self.config.classes) > 1 else []) + features

    # ---- reading --------------------------------------------------------------------------
    def _find_frames(self) -> dict[str, Path]:
        images = sorted(p for p in self.image_dir.iterdir() if is_image_file(p) and p.is_file())
        if not images:
            raise ClipengineError(f"no images in {self.image_dir}")
        frames = {}
        for image in images:
            if image.stem in frames:
                raise ClipengineError(f"{self.image_dir}: two images for frame '{image.stem}'")
            frames[image.stem] = image
        label_frames = {p.stem for p in self.label_dir.glob("*.txt")}
        for frame in sorted(set(frames) - label_frames):
            self.skipped.append({"what": "frame", "file": str(frames[frame]), "reason": "no label file"})
            del frames[frame]
        for frame in sorted(label_frames - set(frames)):
            self.skipped.append({"what": "frame", "file": str(self.label_dir / f"{frame}.txt"), "reason": "no image"})
        if not frames:
            raise ClipengineError(f"no frame of {self.image_dir} has a label file in {self.label_dir}")
        detection_frames = {p.stem: p for p in self.detection_dir.glob("*.txt")}
        if not detection_frames:
            raise ClipengineError(f"no detection files (*.txt) in {self.detection_dir}")
        unknown = sorted(set(detection_frames) - set(frames) - label_frames)
        if unknown:
            raise ClipengineError(
                f"{detection_frames[unknown[0]]}: detections for unknown frame '{unknown[0]}' "
                f"(no {self.image_dir / unknown[0]}.*); is --detections from another dataset?"
            )
        for frame in sorted(set(frames) - set(detection_frames)):
            self.skipped.append(
                {"what": "detections", "file": str(self.detection_dir / f"{frame}.txt"),
                 "reason": "no detection file: the model found nothing in this frame"}
            )
        return dict(sorted(frames.items()))

    def _read_objects(self) -> dict[str, list[dict]]:
        """frame → its ground-truth objects of the chosen classes, each with its match result."""
        if self._objects is not None:
            return self._objects
        import numpy as np

        from clipengine.kernels.boxes import box_iou, match_greedy

        classes = set(self.config.classes)
        result: dict[str, list[dict]] = {}
        count = 0
        for frame in self._frames:
            truth = [o for o in parse_kitti_file(self.label_dir / f"{frame}.txt", with_score=False) if o["type"] in classes]
            kept = []
            for obj in truth:
                x0, y0, x1, y1 = obj["box"]
                if x1 <= x0 or y1 <= y0:
                    self.skipped.append(
                        {"what": "object", "file": str(self.label_dir / f"{frame}.txt"), "line": obj["line"],
                         "reason": f"empty box {obj['box']}"}
                    )
                    continue
                kept.append(obj)
            if self.config.limit is not None and count + len(kept) > self.config.limit:
                kept = kept[: max(0, self.config.limit - count)]
            count += len(kept)
            detection_file = self.detection_dir / f"{frame}.txt"
            detections = parse_kitti_file(detection_file, with_score=True) if detection_file.is_file() else []
            for cls in sorted({o["type"] for o in kept}):
                mine = [o for o in kept if o["type"] == cls]
                theirs = [d for d in detections if d["type"] == cls]
                truth_boxes = np.array([o["box"] for o in mine], dtype=np.float64).reshape(-1, 4)
                det_boxes = np.array([d["box"] for d in theirs], dtype=np.float64).reshape(-1, 4)
                scores = np.array([d["score"] for d in theirs], dtype=np.float64)
                matched = match_greedy(truth_boxes, det_boxes, scores, iou_threshold=self.config.iou_threshold)
                best_iou = box_iou(truth_boxes, det_boxes).max(axis=1) if len(theirs) else np.zeros(len(mine))
                for obj, m, iou in zip(mine, matched, best_iou):
                    obj["matched_score"] = float(scores[m]) if m >= 0 else None
                    obj["best_iou"] = float(iou)
                    obj["error"] = 0.0 if m >= 0 else 1.0
            result[frame] = kept
        self._objects = result
        return result

    # ---- the interface --------------------------------------------------------------------
    def input_files(self) -> list[Path]:
        files = [self.label_dir / f"{frame}.txt" for frame in self._frames]
        files += sorted(self.detection_dir.glob("*.txt"))
        return files

    def list_items(self):
        import polars as pl

        rows = {"path": [], "file": [], "box": []}
        for frame, objects in self._read_objects().items():
            image = self._frames[frame]
            for obj in objects:
                rows["path"].append(image.relative_to(self.root).as_posix())
                rows["file"].append(str(image))
                rows["box"].append([float(v) for v in obj["box"]])
        if not rows["path"]:
            raise ClipengineError(
                f"no ground-truth object of class {', '.join(self.config.classes)} in {self.label_dir}"
            )
        return pl.DataFrame(rows, schema={"path": pl.String, "file": pl.String, "box": pl.List(pl.Float64)})

    def load_errors(self):
        import polars as pl

        rows: dict[str, list] = {k: [] for k in (
            "path", "box", "frame", "object", "class", "error", "matched_score", "best_iou",
            "box_height", "box_width", "box_area", "truncated", "occluded", "distance")}
        for frame, objects in self._read_objects().items():
            image = self._frames[frame]
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                x, y, z = obj["location"]
                rows["path"].append(image.relative_to(self.root).as_posix())
                rows["box"].append([float(v) for v in obj["box"]])
                rows["frame"].append(frame)
                rows["object"].append(obj["line"])
                rows["class"].append(obj["type"])
                rows["error"].append(obj["error"])
                rows["matched_score"].append(obj["matched_score"])
                rows["best_iou"].append(obj["best_iou"])
                rows["box_height"].append(y1 - y0)
                rows["box_width"].append(x1 - x0)
                rows["box_area"].append((x1 - x0) * (y1 - y0))
                rows["truncated"].append(obj["truncated"])
                rows["occluded"].append(OCCLUSION_LEVELS.get(obj["occluded"], "unknown"))
                rows["distance"].append(math.sqrt(x * x + y * y + z * z))
        schema = {
            "path": pl.String, "box": pl.List(pl.Float64), "frame": pl.String, "object": pl.Int64,
            "class": pl.String, "error": pl.Float64, "matched_score": pl.Float64, "best_iou": pl.Float64,
            "box_height": pl.Float64, "box_width": pl.Float64, "box_area": pl.Float64,
            "truncated": pl.Float64, "occluded": pl.String, "distance": pl.Float64,
        }
        return pl.DataFrame(rows, schema=schema)
