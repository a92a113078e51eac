"""Example items for each slice and their thumbnails.

Inside a slice the report shows failures first (then correct items), spread evenly
over the item order; beside each it shows the item outside the slice that agrees
with it on the most remaining attributes ("within group / outside of group").
Thumbnails are object crops (``file`` cropped to ``box``) no larger than
``THUMB_MAX_SIDE`` pixels, written once per item under ``thumbs/`` with a content name.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipengine.artifacts import ERROR_COLUMN, PROB_SUFFIX, THUMBS_DIR
from clipengine.report.rundir import RunData

EXAMPLES_PER_SIDE = 6  # thumbnails inside a slice, and as many outside it (one row each)
THUMB_MAX_SIDE = 160  # pixels; shown at 96 px in the grid, larger when clicked
THUMB_JPEG_QUALITY = 82
SMALL_IMAGE_SIDE = 64  # images this small are kept as PNG
PIXELATED_SIDE = 32  # images this small are drawn with crisp pixels (Fashion-MNIST's 28 px)
LABELS_IN_GRID = 4  # labels under a thumbnail in the grid; all of them when enlarged
_THUMB_NAME = re.compile(r"^[0-9a-f]{20}\.(?:png|jpg)$")  # the names this module gives thumbnails


@dataclass
class Example:
    """One item shown as a thumbnail, with what the report says under it."""

    row: int
    path: str
    src: str | None  # relative URL or data URI; None when the image could not be read
    missing_reason: str | None
    pixelated: bool
    labels: list[tuple[str, str, float | None, str]]  # (attribute, label, probability, css class)
    error: float | None
    inside: bool
    matched: int | None = None  # outside examples: remaining attributes shared with the partner
    of: int | None = None  # ... out of this many
    name: str = ""  # the last part of the path, shown under the thumbnail


def pick_examples(run: RunData, mask, predicate_features: list[str], per_side: int = EXAMPLES_PER_SIDE,
                  *, codes: dict | None = None):
    """(inside rows, [(outside row, shared attributes)], remaining attributes) for one slice.

    ``mask`` is the slice membership, (n,) bool. Rows are indices into ``run.frame``.
    ``codes`` caches each column's value codes across slices.
    """
    import numpy as np

    frame = run.frame
    inside_rows = np.flatnonzero(mask)
    if run.has_error:
        errors = frame.get_column(ERROR_COLUMN).cast(float).fill_null(0.0).fill_nan(0.0).to_numpy()
    else:
        errors = np.zeros(frame.height)
    failed = inside_rows[errors[inside_rows] > 0]
    passed = inside_rows[errors[inside_rows] <= 0]
    failed = failed[np.argsort(-errors[failed], kind="stable")]
    take_failed = min(len(failed), max(per_side - min(len(passed), per_side // 2), per_side // 2))
    chosen = list(_spread(failed, take_failed)) + list(_spread(passed, per_side - take_failed))

    remaining = [a for a in (*run.attributes, *run.extra_features) if a not in predicate_features]
    codes = {} if codes is None else codes
    for name in (*remaining, *predicate_features):
        if name not in codes and name in frame.columns:
            codes[name] = _codes(frame.get_column(name))
    remaining_codes = [codes[a] for a in remaining]
    predicate_codes = [codes[a] for a in predicate_features if a in codes]
    available = ~np.asarray(mask, dtype=bool)
    partners: list[tuple[int, int]] = []
    for row in chosen:
        if not available.any():
            break
        # the nearest item outside: most remaining attributes shared, then most predicates
        shared = np.zeros(frame.height, dtype=np.int64)
        for code in remaining_codes:
            shared += code == code[row]
        closeness = shared * (len(predicate_codes) + 1)
        for code in predicate_codes:
            closeness += code == code[row]
        closeness = np.where(available, closeness, -1)
        best = int(np.argmax(closeness))  # first row among the best: deterministic
        partners.append((best, int(shared[best])))
        available[best] = False
    return [int(r) for r in chosen], partners, remaining


def _spread(rows, k: int):
    """``k`` of ``rows`` spread evenly over their order (all of them when there are fewer)."""
    import numpy as np

    if k <= 0 or len(rows) == 0:
        return rows[:0]
    if len(rows) <= k:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, k).round().astype(np.int64))]


def _codes(column):
    """(n,) int64 codes of a column's values (nulls share one code)."""
    import polars as pl

    return column.cast(pl.Utf8).fill_null("\x00null").rank("dense").cast(pl.Int64).to_numpy()


class ThumbnailWriter:
    """Renders item thumbnails once each, into ``thumbs/`` or as data URIs."""

    def __init__(self, run: RunData, out_dir: Path, *, single_file: bool):
        self.run = run
        self.single_file = single_file
        self.thumbs_dir = out_dir / THUMBS_DIR
        self.written: set[str] = set()
        self._cache: dict[int, tuple[str | None, str | None, bool]] = {}
        self._roots = image_roots(run.run_dir, run.manifest)

    def example(self, row: int, *, inside: bool, focus: tuple[str, ...] = (), matched: int | None = None,
                of: int | None = None) -> Example:
        """The thumbnail and labels of one item; ``focus`` features (the slice's) are listed first
        and highlighted; beyond ``LABELS_IN_GRID`` the rest shows only when enlarged."""
        record = self.run.frame.row(row, named=True)
        src, reason, pixelated = self.thumbnail(row, record)
        names = [*focus, *(a for a in (*self.run.attributes, *self.run.extra_features) if a not in focus)]
        labels = []
        for position, name in enumerate(names):
            prob = record.get(name + PROB_SUFFIX)
            prob = float(prob) if isinstance(prob, (int, float)) and not isinstance(prob, bool) else None
            css = "focus" if name in focus else ("" if position < LABELS_IN_GRID else "more")
            labels.append((name, _label(record.get(name)), prob, css))
        error = record.get(ERROR_COLUMN)
        path = str(record.get("path"))
        return Example(
            row=row,
            path=path,
            src=src,
            missing_reason=reason,
            pixelated=pixelated,
            labels=labels,
            error=float(error) if isinstance(error, (int, float)) else None,
            inside=inside,
            matched=matched,
            of=of,
            name=path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or path,
        )

    def thumbnail(self, row: int, record: dict[str, Any]) -> tuple[str | None, str | None, bool]:
        if row not in self._cache:
            self._cache[row] = self._render(record)
        return self._cache[row]

    def _render(self, record: dict[str, Any]) -> tuple[str | None, str | None, bool]:
        file = resolve_image(str(record.get("file") or record.get("path")), self._roots)
        if file is None:
            return None, "image file not found", False
        rendered = render_thumbnail(file, record.get("box"))
        if isinstance(rendered, str):
            return None, rendered, False
        data, extension, mime, pixelated = rendered
        if self.single_file:
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", None, pixelated
        name = f"{hashlib.sha256(data).hexdigest()[:20]}.{extension}"
        if name not in self.written:
            from clipengine.bindings.files import write_bytes

            target = self.thumbs_dir / name
            if not (target.is_file() and target.read_bytes() == data):
                write_bytes(target, data)
            self.written.add(name)
        return f"{THUMBS_DIR}/{name}", None, pixelated

    def remove_stale(self) -> None:
        """Delete thumbnails of earlier reports that this page does not show (all of them for a
        single-file page), and ``thumbs/`` itself when that leaves it empty."""
        if not self.thumbs_dir.is_dir():
            return
        for child in self.thumbs_dir.iterdir():
            if child.is_file() and _THUMB_NAME.match(child.name) and child.name not in self.written:
                child.unlink()
        if not any(self.thumbs_dir.iterdir()):
            self.thumbs_dir.rmdir()


def image_roots(run_dir: Path, manifest: dict) -> list[Path]:
    """Where relative ``file`` paths may be rooted: the run dir, then the dataset root."""
    roots = [Path(run_dir)]
    for value in (
        manifest.get("root"),
        (manifest.get("dataset") or {}).get("root") if isinstance(manifest.get("dataset"), dict) else None,
        (manifest.get("config") or {}).get("root") if isinstance(manifest.get("config"), dict) else None,
    ):
        if isinstance(value, str) and value:
            roots.append(Path(value))
    return roots


def resolve_image(file: str, roots: list[Path]) -> Path | None:
    """The image ``file`` names: as it is when absolute, else under the first of ``roots`` that has it."""
    path = Path(file)
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def render_thumbnail(file: Path, box=None) -> tuple[bytes, str, str, bool] | str:
    """``(bytes, extension, mime type, pixelated)`` of ``file``'s thumbnail (cropped to ``box``
    [x0, y0, x1, y1] when given; at most ``THUMB_MAX_SIDE`` px; PNG when small, else JPEG), or the
    reason it cannot be shown."""
    from PIL import Image, ImageOps

    from clipengine.encode.decode import IMAGE_FORMATS

    try:
        with Image.open(file, formats=IMAGE_FORMATS) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Exception as error:  # unreadable images become a labelled placeholder
        return f"image could not be read ({type(error).__name__})"
    if box is not None and len(box) == 4:
        x0, y0, x1, y1 = (float(v) for v in box)
        left, top = max(0, int(x0)), max(0, int(y0))
        right, bottom = min(image.width, int(round(x1))), min(image.height, int(round(y1)))
        if right <= left or bottom <= top:
            return "box outside the image"
        image = image.crop((left, top, right, bottom))
    image = image.convert("L") if image.mode in ("L", "1", "I", "I;16", "F") else image.convert("RGB")
    image.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.Resampling.LANCZOS)
    small = max(image.size) <= SMALL_IMAGE_SIDE
    pixelated = max(image.size) <= PIXELATED_SIDE
    buffer = io.BytesIO()
    if small:
        image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue(), "png", "image/png", pixelated
    image.save(buffer, format="JPEG", quality=THUMB_JPEG_QUALITY, optimize=True)
    return buffer.getvalue(), "jpg", "image/jpeg", pixelated


def thumbnail_uri(file: str, box, roots: list[Path]) -> tuple[str | None, str | None, bool]:
    """``(data URI or None, why not, pixelated)`` of an item's thumbnail (self-contained pages)."""
    path = resolve_image(file, roots)
    if path is None:
        return None, "image file not found", False
    rendered = render_thumbnail(path, box)
    if isinstance(rendered, str):
        return None, rendered, False
    data, _, mime, pixelated = rendered
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", None, pixelated


def _label(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
