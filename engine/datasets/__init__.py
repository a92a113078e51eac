"""Dataset adapters, chosen by name from a table of ``"module:Class"`` strings.

Each adapter turns a dataset on disk plus the model-under-test's outputs into items to
encode, per-item errors with metadata, and optional ground truth (``base.Dataset``).
The table also carries each adapter's default schema and one-line description, so the
CLI can list them without importing anything heavy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from clipengine.errors import ClipengineError

# name -> (module:Class, default schema, one-line description)
DATASETS: dict[str, tuple[str, str, str]] = {
    "carla": (
        "clipengine.datasets.carla:CarlaDataset",
        "pedestrian",
        "KITTI object layout (CARLA exports): ROOT/image_2/*.png + ROOT/label_2/*.txt; "
        "--detections DIR holds the model's KITTI-format detections with a score column. "
        "Items are ground-truth objects of --classes; error = no detection matched at IoU >= --iou.",
    ),
    "celeba": (
        "clipengine.datasets.celeba:CelebaDataset",
        "celeba",
        "ROOT/img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt; --predictions FILE "
        "(CSV/Parquet: image_id + error, or image_id + one CelebA attribute column of predictions).",
    ),
    "folder": (
        "clipengine.datasets.folder:FolderDataset",
        "scene",
        "Any image folder + --errors FILE (default ROOT/errors.csv or .parquet): path, error, "
        "optional metadata columns (slice features) and true_<attribute> columns (ground truth).",
    ),
    "fashion-mnist": (
        "clipengine.datasets.fashion_mnist:FashionMnistDataset",
        "fashion",
        "Debian's Fashion-MNIST (no --root needed); the model under test is a softmax-regression "
        "classifier trained here on the training split; first --limit test images (default 2000).",
    ),
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def default_schema(name: str) -> str:
    return _entry(name)[1]


def get_dataset_class(name: str):
    module_name, class_name = _entry(name)[0].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_dataset(name: str, root: Path | None, config=None, *, progress: bool = True):
    """The adapter ``name`` over ``root`` with ``config`` (a ``DatasetConfig``)."""
    return get_dataset_class(name)(root, config, progress=progress)


def _entry(name: str) -> tuple[str, str, str]:
    try:
        return DATASETS[name]
    except KeyError:
        raise ClipengineError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}") from None
