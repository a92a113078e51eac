"""CelebA in its published layout, with the predictions of a model under test.

``ROOT/img_align_celeba/<id>.jpg``, ``ROOT/list_attr_celeba.txt`` (line 1: the image count,
line 2: the 40 attribute names, then ``<id>.jpg`` and 40 values of 1/-1 per line) and
``ROOT/list_eval_partition.txt`` (``<id>.jpg 0|1|2`` = train/val/test).

``--predictions FILE`` (CSV or Parquet) has an ``image_id`` column and either an ``error``
column (0/1 or a non-negative number: the model's per-image error), or one column named
after a CelebA attribute holding the model's prediction of it (1/-1, 1/0 or true/false);
then error = (prediction ≠ ground truth). Items are the images the file lists.
"""

from __future__ import annotations

from pathlib import Path

from clipengine.datasets.base import Dataset, validate_errors
from clipengine.errors import ClipengineError
from clipengine.tables import read_table

PARTITIONS = {0: "train", 1: "val", 2: "test"}


def read_attribute_file(path: Path):
    """``list_attr_celeba.txt`` → (attribute names, frame ``image_id`` + one Int8 ±1 column each)."""
    import polars as pl

    if not path.is_file():
        raise ClipengineError(f"{path} does not exist (the CelebA attribute list)")
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
        try:
            declared = int(first.strip())
        except ValueError:
            raise ClipengineError(f"{path}:1: expected the image count, got {first.strip()[:40]!r}") from None
        names = handle.readline().split()
        if not names:
            raise ClipengineError(f"{path}:2: expected the attribute names")
        ids, values = [], []
        for number, line in enumerate(handle, start=3):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != len(names) + 1:
                raise ClipengineError(f"{path}:{number}: {len(fields)} fields, expected {len(names) + 1} (image id + {len(names)} attributes)")
            try:
                row = [int(v) for v in fields[1:]]
            except ValueError:
                raise ClipengineError(f"{path}:{number}: attribute values must be 1 or -1") from None
            if any(v not in (1, -1) for v in row):
                raise ClipengineError(f"{path}:{number}: attribute values must be 1 or -1")
            ids.append(fields[0])
            values.append(row)
    if len(ids) != declared:
        raise ClipengineError(f"{path}: line 1 declares {declared} images but {len(ids)} are listed")
    columns = {"image_id": ids}
    for j, name in enumerate(names):
        columns[name] = [row[j] for row in values]
    frame = pl.DataFrame(columns).with_columns([pl.col(n).cast(pl.Int8) for n in names])
    return names, frame


def read_partition_file(path: Path):
    import polars as pl

    if not path.is_file():
        raise ClipengineError(f"{path} does not exist (the CelebA partition list)")
    ids, parts = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ClipengineError(f"{path}:{number}: expected '<image id> 0|1|2'")
            ids.append(fields[0])
            parts.append(PARTITIONS[int(fields[1])])
    return pl.DataFrame({"image_id": ids, "partition": parts})


def _as_sign(series, *, source: str):
    """Predictions 1/-1, 1/0 or booleans → Int8 ±1."""
    import polars as pl

    if series.dtype == pl.Boolean:
        return series.cast(pl.Int8) * 2 - 1
    if not series.dtype.is_numeric():
        raise ClipengineError(f"{source}: column '{series.name}' must hold 1/-1, 1/0 or true/false")
    bad = ~series.is_in([1, 0, -1]) | series.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise ClipengineError(f"{source}: row {row + 1} of '{series.name}' is {series[row]!r}; expected 1/-1, 1/0 or true/false")
    return pl.when(series > 0).then(1).otherwise(-1).cast(pl.Int8)


class CelebaDataset(Dataset):
    name = "celeba"
    default_schema = "celeba"
    summary = "CelebA images + a predictions file; ground-truth attributes feed eval"

    def __init__(self, root, config=None, *, progress=True):
        super().__init__(root, config, progress=progress)
        self.image_dir = self.root / "img_align_celeba"
        self.attr_file = self.root / "list_attr_celeba.txt"
        self.partition_file = self.root / "list_eval_partition.txt"
        if not self.image_dir.is_dir():
            raise ClipengineError(f"{self.image_dir} does not exist (expected the CelebA layout)")
        if self.config.predictions is None:
            raise ClipengineError("dataset 'celeba' needs --predictions FILE (image_id + error, or image_id + an attribute column)")
        self.predictions_file = Path(self.config.predictions).expanduser().resolve()
        self._table = None

    def settings(self) -> dict:
        return {"predictions": str(self.predictions_file), "limit": self.config.limit}

    def input_files(self) -> list[Path]:
        return [self.attr_file, self.partition_file, self.predictions_file]

    def _joined(self):
        """One row per predicted image: image_id, error, target, partition, the 40 attributes."""
        if self._table is not None:
            return self._table
        import polars as pl

        names, attributes = read_attribute_file(self.attr_file)
        partitions = read_partition_file(self.partition_file)
        source = str(self.predictions_file)
        predictions = read_table(self.predictions_file, what="predictions")
        if "image_id" not in predictions.columns:
            raise ClipengineError(f"{source}: no 'image_id' column (columns: {', '.join(predictions.columns)})")
        predictions = predictions.with_columns(pl.col("image_id").cast(pl.String))
        duplicated = predictions.get_column("image_id").is_duplicated()
        if duplicated.any():
            raise ClipengineError(f"{source}: image_id {predictions['image_id'][int(duplicated.arg_true()[0])]!r} is listed twice")
        unknown = predictions.join(attributes.select("image_id"), on="image_id", how="anti")
        if unknown.height:
            raise ClipengineError(f"{source}: image_id {unknown['image_id'][0]!r} is not in {self.attr_file.name}")
        if "error" in predictions.columns:
            predictions = validate_errors(predictions, source=source)
            frame = predictions.select("image_id", "error").with_columns(pl.lit(None, dtype=pl.String).alias("target"))
        else:
            targets = [c for c in predictions.columns if c in names]
            if len(targets) != 1:
                raise ClipengineError(
                    f"{source}: needs an 'error' column or exactly one CelebA attribute column of predictions "
                    f"(found {targets or 'none'})"
                )
            target = targets[0]
            frame = predictions.select("image_id", _as_sign(predictions.get_column(target), source=source).alias("_pred"))
            frame = frame.join(attributes.select("image_id", pl.col(target).alias("_true")), on="image_id", how="left")
            frame = frame.select(
                "image_id",
                (pl.col("_pred") != pl.col("_true")).cast(pl.Float64).alias("error"),
                pl.lit(target).alias("target"),
            )
        frame = frame.join(partitions, on="image_id", how="left").join(attributes, on="image_id", how="left")
        frame = frame.sort("image_id")
        if self.config.limit is not None:
            frame = frame.head(self.config.limit)
        if frame.height == 0:
            raise ClipengineError(f"{source}: lists no image")
        self._names = names
        self._table = frame
        return frame

    def list_items(self):
        import polars as pl

        frame = self._joined()
        return frame.select(
            pl.col("image_id").alias("path"),
            (pl.lit(str(self.image_dir) + "/") + pl.col("image_id")).alias("file"),
        )

    def load_errors(self):
        import polars as pl

        frame = self._joined()
        return frame.select(pl.col("image_id").alias("path"), "error", "partition", "target")

    def load_truth(self):
        import polars as pl

        frame = self._joined()
        return frame.select([pl.col("image_id").alias("path")] + list(self._names))
