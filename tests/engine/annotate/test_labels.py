"""The labels file contract: rows matched to the run's items, classes checked, one-line errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine.annotate.labels import read_labels
from clipengine.errors import ClipengineError

CLASSES = {"weather": ("fog", "rain", "clear"), "time": ("day", "night")}
ITEMS = pl.DataFrame({"path": [f"img{i}.jpg" for i in range(10)]})


def _write(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_a_filled_sheet_reads_back_with_its_rows_and_weights(tmp_path):
    path = _write(tmp_path, "path,weather,true_weather,true_time,inclusion_prob\n"
                            "img3.jpg,fog,rain,night,0.2\nimg7.jpg,fog,,day,0.5\nimg0.jpg,clear,clear,,0.2\n")
    labels = read_labels(path, ITEMS, CLASSES)
    assert labels.rows.tolist() == [3, 7, 0]
    assert labels.truth["weather"].tolist() == ["rain", None, "clear"]
    assert labels.labelled("time").tolist() == [True, True, False]
    np.testing.assert_allclose(labels.weights(), [5.0, 2.0, 5.0])
    assert labels.population == 10


def test_without_inclusion_probabilities_the_sample_is_taken_as_uniform(tmp_path):
    labels = read_labels(_write(tmp_path, "path,true_time\nimg1.jpg,day\nimg2.jpg,night\n"), ITEMS, CLASSES)
    np.testing.assert_allclose(labels.inclusion, [0.2, 0.2])


def test_boxes_identify_object_items(tmp_path):
    items = pl.DataFrame({"path": ["a.jpg", "a.jpg"], "box": [[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]]})
    path = _write(tmp_path, 'path,box,true_time\na.jpg,"[1, 1, 9, 9]",night\n')
    assert read_labels(path, items, CLASSES).rows.tolist() == [1]


@pytest.mark.parametrize("text, message", [
    ("path,true_time\n", "lists no labelled item"),
    ("file,true_time\nimg1.jpg,day\n", "no 'path' column"),
    ("path,weather\nimg1.jpg,fog\n", "no true_<attribute> column"),
    ("path,true_season\nimg1.jpg,winter\n", "column 'true_season' names no attribute of the schema"),
    ("path,true_time\nimg1.jpg,day\nnope.jpg,day\n", "row 2, column 'path': 'nope.jpg' is not an item of this run"),
    ("path,true_time\nimg1.jpg,dusk\n", "row 1, column 'true_time': 'dusk' is not a class of the attribute"),
    ("path,true_time\nimg1.jpg,day\nimg1.jpg,night\n", "row 2 repeats the item of row 1"),
    ("path,true_time\nimg1.jpg,\n", "no row has a true_<attribute> value yet"),
    ("path,true_time,inclusion_prob\nimg1.jpg,day,0\n", "row 1, column 'inclusion_prob': 0 is not a probability"),
    ("path,true_time,inclusion_prob\nimg1.jpg,day,1.5\n", "is not a probability in (0, 1]"),
])
def test_a_bad_labels_file_is_one_line_naming_row_and_column(tmp_path, text, message):
    with pytest.raises(ClipengineError) as caught:
        read_labels(_write(tmp_path, text), ITEMS, CLASSES)
    assert message in str(caught.value) and "labels.csv" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_object_runs_need_the_box_column(tmp_path):
    items = pl.DataFrame({"path": ["a.jpg"], "box": [[0.0, 0.0, 5.0, 5.0]]})
    with pytest.raises(ClipengineError, match="needs a 'box' column"):
        read_labels(_write(tmp_path, "path,true_time\na.jpg,day\n"), items, CLASSES)


def test_csv_columns_are_read_as_written(tmp_path):
    items = pl.DataFrame({"path": ["007", "7"]})
    labels = read_labels(_write(tmp_path, "path,true_time\n007,day\n"), items, CLASSES)
    assert labels.rows.tolist() == [0]  # not the number 7


# ---- Label Studio's export ------------------------------------------------------------------------
def _export(tmp_path, tasks):
    import json

    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def _task(path, choices=None, *, cancelled=False, inclusion=None, earlier=None):
    data = {"image": "data:image/png;base64,AAAA", "path": path}
    if inclusion is not None:
        data["inclusion_prob"] = inclusion
    results = [{"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}
               for name, value in (choices or {}).items()]
    annotations = []
    if earlier is not None:
        annotations.append({"id": 1, "was_cancelled": False, "result": [
            {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}
            for name, value in earlier.items()]})
    if choices is not None:
        annotations.append({"id": 2, "was_cancelled": cancelled, "result": results + [
            {"from_name": "notes", "to_name": "image", "type": "textarea", "value": {"text": ["blurry"]}}]})
    return {"id": 7, "data": data, "annotations": annotations,
            "predictions": [{"result": [{"from_name": "time", "type": "choices", "value": {"choices": ["day"]}}]}]}


def test_label_studio_json_export_reads_like_the_sheet(tmp_path):
    path = _export(tmp_path, [
        _task("img3.jpg", {"weather": "rain", "time": "night"}, inclusion=0.2),
        _task("img7.jpg", {"time": "day"}, earlier={"time": "night"}, inclusion=0.5),  # the last annotation counts
        _task("img0.jpg", None, inclusion=0.2),  # not labelled yet
        _task("img1.jpg", {"time": "day"}, cancelled=True, inclusion=0.2),  # a skipped task labels nothing
    ])
    labels = read_labels(path, ITEMS, CLASSES)
    assert labels.rows.tolist() == [3, 7, 0, 1]
    assert labels.truth["weather"].tolist() == ["rain", None, None, None]
    assert labels.truth["time"].tolist() == ["night", "day", None, None]
    np.testing.assert_allclose(labels.inclusion, [0.2, 0.5, 0.2, 0.2])


def test_label_studio_json_min_export(tmp_path):
    path = _export(tmp_path, [{"path": "img2.jpg", "time": "night", "annotator": 1},
                              {"path": "img4.jpg", "weather": "fog"}])
    labels = read_labels(path, ITEMS, CLASSES)
    assert labels.rows.tolist() == [2, 4]
    assert labels.truth["time"].tolist() == ["night", None]


@pytest.mark.parametrize("tasks, message", [
    ([_task("img1.jpg", {"season": "winter"})], "choice 'season' names no attribute of the schema"),
    ([_task("img1.jpg", {"time": "day"}), _task("nope.jpg", {"time": "day"})],
     "task 2, data field 'path': 'nope.jpg' is not an item of this run"),
    ([_task("img1.jpg", {"time": "dusk"})], "task 1, choice 'time': 'dusk' is not a class of the attribute"),
    ([_task("img1.jpg", None)], "no task has an annotation yet"),
    ([_task("img1.jpg", {"time": "day"}, inclusion=2)], "task 1, data field 'inclusion_prob': 2 is not a probability"),
    ([], "lists no labelled item"),
])
def test_a_bad_label_studio_export_names_the_task_and_field(tmp_path, tasks, message):
    with pytest.raises(ClipengineError) as caught:
        read_labels(_export(tmp_path, tasks), ITEMS, CLASSES)
    assert message in str(caught.value) and "export.json" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_two_choices_for_one_attribute_are_refused(tmp_path):
    task = _task("img1.jpg", {"time": "day"})
    task["annotations"][0]["result"][0]["value"]["choices"] = ["day", "night"]
    with pytest.raises(ClipengineError, match="task 1, choice 'time': 2 classes chosen"):
        read_labels(_export(tmp_path, [task]), ITEMS, CLASSES)
