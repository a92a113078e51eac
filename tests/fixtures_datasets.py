"""Builders of small datasets in the real on-disk layouts (imported by the dataset and run tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CARLA_SIZE = (200, 120)

# frame -> list of (type, box, location); the pedestrians' expected error is in CARLA_EXPECTED
CARLA_TRUTH = {
    "000000": [
        ("Pedestrian", (20, 30, 50, 100), (1.0, 1.5, 8.0)),
        ("Pedestrian", (100, 20, 130, 110), (-2.0, 1.5, 6.0)),
        ("Car", (150, 60, 190, 100), (5.0, 1.5, 20.0)),
    ],
    "000001": [
        ("Pedestrian", (10, 10, 40, 90), (1.0, 1.5, 12.0)),
        ("Pedestrian", (60, 10, 90, 90), (3.0, 1.5, 15.0)),
    ],
    "000002": [("Pedestrian", (5, 5, 35, 85), (0.5, 1.5, 30.0))],
}
CARLA_DETECTIONS = {
    "000000": [
        ("Pedestrian", (20, 30, 50, 100), 0.9),  # exact: matched
        ("Pedestrian", (118, 20, 148, 110), 0.8),  # IoU 12/48 = 0.25 with the second: missed
        ("Car", (150, 60, 190, 100), 0.7),
    ],
    "000001": [
        ("Car", (10, 10, 40, 90), 0.95),  # right box, wrong class: missed
        ("Pedestrian", (64, 10, 94, 90), 0.6),  # IoU 26/34 = 0.76: matched
    ],
    # 000002: no detection file → missed
}
# (frame, box) -> expected error for class Pedestrian
CARLA_EXPECTED = {
    ("000000", (20, 30, 50, 100)): 0.0,
    ("000000", (100, 20, 130, 110)): 1.0,
    ("000001", (10, 10, 40, 90)): 1.0,
    ("000001", (60, 10, 90, 90)): 0.0,
    ("000002", (5, 5, 35, 85)): 1.0,
}


def kitti_line(kind, box, location=(0.0, 1.5, 10.0), score=None, truncated=0.0, occluded=0):
    fields = [kind, f"{truncated:.2f}", str(occluded), "-1.57", *(f"{v:.2f}" for v in box), "1.70", "0.60", "0.80",
              *(f"{v:.2f}" for v in location), "0.00"]
    if score is not None:
        fields.append(f"{score:.3f}")
    return " ".join(fields)


def draw_scene(size, objects, seed):
    """A street-like frame: sky, road, and a simple figure (head + body) or car body per box."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (110, 150, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size[1] // 2, size[0], size[1]], fill=(70, 70, 75))
    for kind, (x0, y0, x1, y1), *_ in objects:
        colour = tuple(int(c) for c in rng.integers(30, 230, 3))
        if kind == "Pedestrian":
            head = (x1 - x0) * 0.35
            cx = (x0 + x1) / 2
            draw.ellipse([cx - head, y0, cx + head, y0 + 2 * head], fill=(230, 190, 160))
            draw.rectangle([x0 + 3, y0 + 2 * head, x1 - 3, y1 - (y1 - y0) * 0.35], fill=colour)
            draw.rectangle([x0 + 5, y1 - (y1 - y0) * 0.35, x1 - 5, y1], fill=(40, 40, 90))
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    return image


def make_carla(root: Path, *, frames: dict | None = None, detections: dict | None = None) -> tuple[Path, Path]:
    """A KITTI-layout CARLA export under ``root``: returns (dataset root, detections folder)."""
    frames = CARLA_TRUTH if frames is None else frames
    detections = CARLA_DETECTIONS if detections is None else detections
    data = root / "carla"
    (data / "image_2").mkdir(parents=True, exist_ok=True)
    (data / "label_2").mkdir(parents=True, exist_ok=True)
    det_dir = root / "detections"
    det_dir.mkdir(parents=True, exist_ok=True)
    for i, (frame, objects) in enumerate(sorted(frames.items())):
        draw_scene(CARLA_SIZE, objects, i).save(data / "image_2" / f"{frame}.png")
        lines = [kitti_line(k, b, loc) for k, b, loc in objects]
        lines.append(kitti_line("DontCare", (0, 0, 5, 5), (-1000, -1000, -1000)))
        (data / "label_2" / f"{frame}.txt").write_text("\n".join(lines) + "\n")
    for frame, dets in detections.items():
        (det_dir / f"{frame}.txt").write_text("\n".join(kitti_line(k, b, score=s) for k, b, s in dets) + "\n")
    return data, det_dir


CELEBA_ATTRIBUTES = ["Eyeglasses", "Male", "Smiling", "Young"]
CELEBA_ROWS = {
    "000001.jpg": [-1, 1, 1, 1],
    "000002.jpg": [1, -1, -1, 1],
    "000003.jpg": [-1, -1, 1, -1],
    "000004.jpg": [-1, 1, -1, 1],
    "000005.jpg": [1, 1, 1, -1],
    "000006.jpg": [-1, -1, -1, 1],
}


def make_celeba(root: Path, *, smiling_predictions: dict | None = None) -> tuple[Path, Path]:
    """A CelebA-layout folder and a predictions CSV (image_id, Smiling): returns (root, predictions)."""
    data = root / "celeba"
    (data / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in CELEBA_ROWS:
        pixels = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / "img_align_celeba" / name, quality=90)
    lines = [str(len(CELEBA_ROWS)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in CELEBA_ROWS.items()]
    (data / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (data / "list_eval_partition.txt").write_text(
        "\n".join(f"{name} {i % 3}" for i, name in enumerate(CELEBA_ROWS)) + "\n"
    )
    if smiling_predictions is None:  # wrong on 000002 and 000005
        smiling_predictions = {"000001.jpg": 1, "000002.jpg": 1, "000003.jpg": 1, "000004.jpg": -1,
                               "000005.jpg": -1, "000006.jpg": -1}
    predictions = root / "celeba_predictions.csv"
    predictions.write_text("image_id,Smiling\n" + "".join(f"{k},{v}\n" for k, v in smiling_predictions.items()))
    return data, predictions


FOLDER_ROWS = [
    ("city/a.png", 1, "rain", 3.5),
    ("city/b.png", 0, "sun", 1.0),
    ("field/c.jpg", 0, "sun", 2.0),
    ("field/d.jpg", 1, "fog", 4.0),
]


def make_folder(root: Path, *, extra_image: bool = True) -> Path:
    """An image folder with errors.csv (path, error, weather, speed, true_scene)."""
    data = root / "folder"
    rng = np.random.default_rng(5)
    for path, *_ in FOLDER_ROWS:
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / path)
    if extra_image:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / "unlisted.png")
    lines = ["path,error,weather,speed,true_scene"]
    lines += [f"{p},{e},{w},{s},{'urban' if p.startswith('city') else 'rural'}" for p, e, w, s in FOLDER_ROWS]
    (data / "errors.csv").write_text("\n".join(lines) + "\n")
    return data
