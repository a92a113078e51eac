"""What to encode: image files from a folder, a list file or one image, and optional object boxes.

One list of the image extensions clipengine reads (:data:`IMAGE_EXTENSIONS`), used by every
dataset adapter as well.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipengine.errors import ClipengineError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(source: str | os.PathLike) -> list[str]:
    """Image files to encode: a folder → every image file below it (by extension, hidden entries
    left out, sorted by relative path); a text file (.txt/.lst/.list) → its lines (blank lines and
    ``#`` comments dropped; relative paths are relative to the list file's folder); an image file → itself."""
    path = Path(source)
    if path.is_dir():
        found: list[str] = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel_root = Path(root).relative_to(path)
            found.extend(
                (rel_root / name).as_posix()
                for name in names
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
            )
        return [str(path / rel) for rel in sorted(found)]
    if not path.exists():
        raise ClipengineError(f"{source}: no such file or folder")
    if path.suffix.lower() in LIST_EXTENSIONS:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ClipengineError(f"{source}: a list of image paths must be UTF-8 text") from None
        entries = [line.strip() for line in lines]
        return [str(path.parent / e) if not os.path.isabs(e) else e for e in entries if e and not e.startswith("#")]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(path)]
    raise ClipengineError(
        f"{source}: expected a folder of images, an image, or a text file of paths (.txt, .lst, .list)"
    )


def items_from_input(source: str | os.PathLike, *, boxes: str | os.PathLike | None = None):
    """A Polars items frame from the CLI input: a folder (recursive) or a text file of paths, and
    optionally a boxes table (CSV or Parquet with ``path, x0, y0, x1, y1``; each box is one item;
    ``path`` as listed by the input or relative to the input folder)."""
    import polars as pl

    from clipengine.encode.inputs import list_image_files

    files = list_image_files(source)
    if boxes is None:
        return pl.DataFrame({"path": files}, schema={"path": pl.String})
    table = _read_boxes(Path(boxes))
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    known = set(files)
    resolved = []
    for path in table["path"].to_list():
        candidate = path if path in known or os.path.isabs(path) else str(base / path)
        resolved.append(candidate)
    box_values = table.select(["x0", "y0", "x1", "y1"]).to_numpy().astype(float).tolist()
    return pl.DataFrame({"path": resolved, "box": box_values}, schema={"path": pl.String, "box": pl.List(pl.Float64)})


def _read_boxes(path: Path):
    import polars as pl

    if not path.is_file():
        raise ClipengineError(f"--boxes {path}: no such file")
    try:
        table = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path)
    except Exception as error:
        raise ClipengineError(f"--boxes {path}: not a readable CSV/Parquet table ({type(error).__name__})") from None
    missing = [c for c in ("path", "x0", "y0", "x1", "y1") if c not in table.columns]
    if missing:
        raise ClipengineError(f"--boxes {path}: missing column(s) {', '.join(missing)} (need path, x0, y0, x1, y1)")
    for column in ("x0", "y0", "x1", "y1"):
        if not table[column].dtype.is_numeric() or table[column].null_count():
            raise ClipengineError(f"--boxes {path}: column {column!r} must be numbers without gaps")
    return table.with_columns(pl.col("path").cast(pl.String))
