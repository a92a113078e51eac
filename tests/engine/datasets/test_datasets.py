import os

import numpy as np
import polars as pl
import pytest
from PIL import Image

from clipengine.config import DatasetConfig
from clipengine.datasets import DATASETS, create_dataset, default_schema
from clipengine.errors import ClipengineError

from tests.fixtures_datasets import (
    CARLA_EXPECTED,
    CELEBA_ROWS,
    FOLDER_ROWS,
    kitti_line,
    make_carla,
    make_celeba,
    make_folder,
)


def test_registry_names_and_default_schemas():
    assert set(DATASETS) == {"carla", "celeba", "folder", "fashion-mnist"}
    assert [default_schema(n) for n in ("carla", "celeba", "folder", "fashion-mnist")] == [
        "pedestrian", "celeba", "scene", "fashion"]
    with pytest.raises(ClipengineError, match="unknown dataset 'kitti'"):
        create_dataset("kitti", None)


# ---- carla ------------------------------------------------------------------------------------
def test_carla_items_errors_and_metadata(tmp_path):
    root, dets = make_carla(tmp_path)
    dataset = create_dataset("carla", root, DatasetConfig(detections=dets))
    items = dataset.list_items()
    assert items.columns == ["path", "file", "box"]
    assert items.height == len(CARLA_EXPECTED)
    errors = dataset.load_errors()
    assert errors.select("path", "box").equals(items.select("path", "box"))
    got = {(row["frame"], tuple(int(v) for v in row["box"])): row["error"] for row in errors.iter_rows(named=True)}
    assert got == CARLA_EXPECTED
    first = errors.row(0, named=True)
    assert first["path"] == "image_2/000000.png"
    assert first["box_height"] == 70 and first["box_width"] == 30 and first["box_area"] == 2100
    assert first["distance"] == pytest.approx(np.sqrt(1 + 1.5**2 + 64))
    assert first["occluded"] == "fully visible"
    assert set(dataset.error_features()) == {"box_height", "box_width", "box_area", "truncated", "occluded", "distance"}
    # the frame without a detection file is recorded
    assert any(s["what"] == "detections" and s["file"].endswith("000002.txt") for s in dataset.skipped)
    assert all(Image.open(f).size == (200, 120) for f in items["file"].to_list())


def test_carla_classes_and_threshold_are_configurable(tmp_path):
    root, dets = make_carla(tmp_path)
    both = create_dataset("carla", root, DatasetConfig(detections=dets, classes=("Pedestrian", "Car")))
    errors = both.load_errors()
    assert errors.height == len(CARLA_EXPECTED) + 1
    assert errors.filter(pl.col("class") == "Car")["error"].to_list() == [0.0]
    assert "class" in both.error_features()
    strict = create_dataset("carla", root, DatasetConfig(detections=dets, iou_threshold=0.8))
    assert strict.load_errors()["error"].sum() == 4  # the 0.76 match no longer counts
    loose = create_dataset("carla", root, DatasetConfig(detections=dets, iou_threshold=0.2))
    assert loose.load_errors()["error"].sum() == 2  # the 0.25 box now matches


def test_carla_malformed_label_line_names_file_and_line(tmp_path):
    root, dets = make_carla(tmp_path)
    label = root / "label_2" / "000001.txt"
    lines = label.read_text().splitlines()
    lines.insert(1, "Pedestrian 0.00 0 -1.57 10 10 40")
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(ClipengineError, match=r"000001\.txt:2: 7 fields, expected 15"):
        create_dataset("carla", root, DatasetConfig(detections=dets)).list_items()


def test_carla_detection_without_score_and_unknown_frame(tmp_path):
    root, dets = make_carla(tmp_path)
    (dets / "000001.txt").write_text(kitti_line("Pedestrian", (1, 2, 3, 4)) + "\n")
    with pytest.raises(ClipengineError, match=r"000001\.txt:1: 15 fields, expected 16"):
        create_dataset("carla", root, DatasetConfig(detections=dets)).load_errors()
    (dets / "000001.txt").write_text("")
    (dets / "000777.txt").write_text(kitti_line("Pedestrian", (1, 2, 3, 4), score=0.5) + "\n")
    with pytest.raises(ClipengineError, match=r"000777\.txt: detections for unknown frame '000777'"):
        create_dataset("carla", root, DatasetConfig(detections=dets))


def test_carla_missing_pieces(tmp_path):
    root, dets = make_carla(tmp_path)
    with pytest.raises(ClipengineError, match="needs --detections"):
        create_dataset("carla", root, DatasetConfig())
    with pytest.raises(ClipengineError, match="needs --root"):
        create_dataset("carla", None, DatasetConfig(detections=dets))
    empty = tmp_path / "empty"
    (empty / "image_2").mkdir(parents=True)
    (empty / "label_2").mkdir()
    with pytest.raises(ClipengineError, match="no images in"):
        create_dataset("carla", empty, DatasetConfig(detections=dets))
    with pytest.raises(ClipengineError, match="image_2 does not exist"):
        create_dataset("carla", tmp_path / "detections", DatasetConfig(detections=dets))
    # an image without a label file is skipped and recorded
    Image.new("RGB", (20, 20)).save(root / "image_2" / "000009.png")
    dataset = create_dataset("carla", root, DatasetConfig(detections=dets))
    assert any(s["reason"] == "no label file" for s in dataset.skipped)
    assert dataset.list_items().height == len(CARLA_EXPECTED)


# ---- celeba -----------------------------------------------------------------------------------
def test_celeba_attribute_predictions_give_errors_and_truth(tmp_path):
    root, predictions = make_celeba(tmp_path)
    dataset = create_dataset("celeba", root, DatasetConfig(predictions=predictions))
    items = dataset.list_items()
    assert items["path"].to_list() == sorted(CELEBA_ROWS)
    assert all(Image.open(f).size == (40, 48) for f in items["file"].to_list())
    errors = dataset.load_errors()
    assert dict(zip(errors["path"], errors["error"])) == {
        "000001.jpg": 0.0, "000002.jpg": 1.0, "000003.jpg": 0.0, "000004.jpg": 0.0, "000005.jpg": 1.0, "000006.jpg": 0.0}
    assert errors["partition"].to_list()[:3] == ["train", "val", "test"]
    truth = dataset.load_truth()
    assert truth.columns == ["path", "Eyeglasses", "Male", "Smiling", "Young"]
    assert truth.filter(pl.col("path") == "000002.jpg").row(0)[1:] == (1, -1, -1, 1)


def test_celeba_error_column_and_malformed_inputs(tmp_path):
    root, _ = make_celeba(tmp_path)
    direct = tmp_path / "errors.csv"
    direct.write_text("image_id,error\n000003.jpg,1\n000001.jpg,0\n")
    dataset = create_dataset("celeba", root, DatasetConfig(predictions=direct))
    assert dataset.load_errors().select("path", "error").rows() == [("000001.jpg", 0.0), ("000003.jpg", 1.0)]

    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,error\n000003.jpg,-1\n")
    with pytest.raises(ClipengineError, match="row 1 of error column 'error' has a negative value"):
        create_dataset("celeba", root, DatasetConfig(predictions=bad)).list_items()
    bad.write_text("image_id,error\n999999.jpg,1\n")
    with pytest.raises(ClipengineError, match="'999999.jpg' is not in list_attr_celeba.txt"):
        create_dataset("celeba", root, DatasetConfig(predictions=bad)).list_items()
    bad.write_text("image_id,Smiling,Male\n000003.jpg,1,1\n")
    with pytest.raises(ClipengineError, match="exactly one CelebA attribute column"):
        create_dataset("celeba", root, DatasetConfig(predictions=bad)).list_items()

    attr = root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = lines[4] + " 1"
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(ClipengineError, match=r"list_attr_celeba\.txt:5: 6 fields, expected 5"):
        create_dataset("celeba", root, DatasetConfig(predictions=direct)).list_items()


# ---- folder -----------------------------------------------------------------------------------
def test_folder_items_errors_metadata_truth(tmp_path):
    root = make_folder(tmp_path)
    dataset = create_dataset("folder", root, DatasetConfig())
    items = dataset.list_items()
    assert items["path"].to_list() == [r[0] for r in FOLDER_ROWS]
    assert all(Image.open(f).size == (56, 40) for f in items["file"].to_list())
    errors = dataset.load_errors()
    assert errors.columns == ["path", "error", "weather", "speed"]
    assert errors["error"].to_list() == [1.0, 0.0, 0.0, 1.0]
    assert dataset.error_features() == ["weather", "speed"]
    assert dataset.load_truth().columns == ["path", "true_scene"]
    assert dataset.truth_mapping() == {"scene": "true_scene"}
    assert dataset.skipped and dataset.skipped[0]["count"] == 1  # unlisted.png


def test_folder_malformed_errors_file(tmp_path):
    root = make_folder(tmp_path)
    table = root / "errors.csv"
    table.write_text("path,error\ncity/a.png,yes\n")
    with pytest.raises(ClipengineError, match="column 'error' must be numeric"):
        create_dataset("folder", root, DatasetConfig()).list_items()
    table.write_text("file,error\ncity/a.png,1\n")
    with pytest.raises(ClipengineError, match="no 'path' column"):
        create_dataset("folder", root, DatasetConfig()).list_items()
    table.write_text("path,error\ncity/a.png,1\ncity/a.png,0\n")
    with pytest.raises(ClipengineError, match="listed twice"):
        create_dataset("folder", root, DatasetConfig()).list_items()
    table.write_text("path,error\n../x.png,1\n")
    with pytest.raises(ClipengineError, match="without '..'"):
        create_dataset("folder", root, DatasetConfig()).list_items()
    table.unlink()
    with pytest.raises(ClipengineError, match="errors.csv"):
        create_dataset("folder", root, DatasetConfig())


# ---- fashion-mnist ----------------------------------------------------------------------------
def test_fashion_mnist_items_pngs_errors_truth(tmp_path):
    from clipengine import envs
    from clipengine.datasets.fashion_mnist import CLASSES, FILES, read_idx

    if not (envs.fashion_mnist_dir() / FILES["test_images"]).is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    dataset = create_dataset("fashion-mnist", None, DatasetConfig(limit=60), progress=False)
    items = dataset.list_items()
    assert items["path"].to_list()[:2] == ["test/000000", "test/000001"] and items.height == 60
    images = read_idx(envs.fashion_mnist_dir() / FILES["test_images"])
    labels = read_idx(envs.fashion_mnist_dir() / FILES["test_labels"])
    for i in (0, 59):
        assert np.array_equal(np.asarray(Image.open(items["file"][i])), images[i])
    assert str(envs.cache_dir()) in items["file"][0]
    errors = dataset.load_errors()
    assert errors["path"].equals(items["path"])
    assert errors["label"].to_list() == [CLASSES[v] for v in labels[:60]]
    assert (errors["error"] == (errors["label"] != errors["predicted"]).cast(pl.Float64)).all()
    assert 0.02 < errors["error"].mean() < 0.4  # an ≈83 %-accurate classifier
    assert dataset.load_truth()["label"].equals(errors["label"])
    # a second adapter reuses the written PNGs (same files, not rewritten)
    mtime = os.stat(items["file"][0]).st_mtime_ns
    again = create_dataset("fashion-mnist", None, DatasetConfig(limit=60), progress=False).list_items()
    assert again.equals(items) and os.stat(items["file"][0]).st_mtime_ns == mtime


def test_fashion_mnist_bad_files(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    for name in ("t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"junk")
    dataset = create_dataset("fashion-mnist", tmp_path, DatasetConfig(limit=5), progress=False)
    with pytest.raises(ClipengineError, match="header declares shape"):
        dataset.list_items()
    with pytest.raises(ClipengineError, match="is not a folder"):
        create_dataset("fashion-mnist", tmp_path / "nothing", DatasetConfig())
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(ClipengineError, match="train-labels-idx1-ubyte.gz does not exist"):
        create_dataset("fashion-mnist", tmp_path, DatasetConfig())
