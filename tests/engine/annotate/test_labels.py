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
