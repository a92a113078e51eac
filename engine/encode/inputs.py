"""What to encode: image files from a folder, a list file or one image, and optional object boxes.

One list of the image extensions clipengine reads (:data:`IMAGE_EXTENSIONS`), used by every
dataset adapter as well. The extension only selects which files are listed; which decoder reads a
file is decided by its content, among :data:`clipengine.encode.decode.IMAGE_FORMATS`.

A folder is walked without recursion (any depth), hidden entries left out. Files are read only
inside the folder: an entry that is a symbolic link to a file or folder outside it is left out, and
recorded, unless ``follow_links`` (``--follow-links``) is given; links to folders are followed only
then, each real folder once (no loops). A file whose name is not UTF-8 cannot be an item (item
paths are text in every table) and is left out and recorded too. What is left out comes back as
:class:`LeftOut` records, which the encode stage writes to ``skipped.parquet``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from clipengine.errors import ClipengineError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
FOLLOW_LINKS_HINT = "pass --follow-links to read it"


class LeftOut(NamedTuple):
    """An input that never became an item: ``path`` as text (bytes that are not UTF-8 shown as
    ``\\xNN``) and ``reason`` (``"<code>: <detail>"``, as a skip reason)."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageFiles:
    """A listing: ``files`` to encode (str paths, sorted by relative path for a folder) and what was
    ``left_out``."""

    files: list[str]
    left_out: list[LeftOut] = field(default_factory=list)


class EncodeInputs(NamedTuple):
    """``items`` (a Polars frame: ``path`` [, ``box``]) and the inputs ``left_out`` of it."""

    items: object
    left_out: list[LeftOut]


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(source: str | os.PathLike, *, follow_links: bool = False) -> list[str]:
    """The files of :func:`find_image_files` (what it leaves out is dropped)."""
    return find_image_files(source, follow_links=follow_links).files


def find_image_files(source: str | os.PathLike, *, follow_links: bool = False) -> ImageFiles:
    """Image files to encode: a folder → every image file below it (by extension, hidden entries
    left out, sorted by relative path; see the module docstring for links and names); a text file
    (.txt/.lst/.list) → its lines (blank lines and ``#`` comments dropped; relative paths are
    relative to the list file's folder); an image file → itself."""
    path = Path(source)
    if path.is_dir():
        return _walk_folder(path, follow_links)
    if not path.exists():
        raise ClipengineError(f"{source}: no such file or folder")
    if path.suffix.lower() in LIST_EXTENSIONS:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ClipengineError(f"{source}: a list of image paths must be UTF-8 text") from None
        entries = [line.strip() for line in lines]
        return ImageFiles([str(path.parent / e) if not os.path.isabs(e) else e
                           for e in entries if e and not e.startswith("#")])
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFiles([str(path)])
    raise ClipengineError(
        f"{source}: expected a folder of images, an image, or a text file of paths (.txt, .lst, .list)"
    )


def shown_name(name: str) -> str:
    """A file name as text a table can hold: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) written ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_text_name(name: str) -> bool:
    """Whether a file name (as Python decoded it) is valid UTF-8, so that tables can hold it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def inside(real: str, real_root: str) -> bool:
    """Whether the resolved path ``real`` lies in (or is) the resolved folder ``real_root``."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _walk_folder(folder: Path, follow_links: bool) -> ImageFiles:
    """Iterative walk (no recursion limit on depth) of ``folder``; see :func:`find_image_files`."""
    real_root = os.path.realpath(folder)
    found: list[str] = []  # relative POSIX paths
    left_out: list[LeftOut] = []
    seen_folders = {real_root}
    pending = [""]  # relative paths of the folders still to read
    while pending:
        relative = pending.pop()
        current = os.path.join(folder, relative) if relative else os.fspath(folder)
        try:
            with os.scandir(current) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)  # the walk's order decides which
                # spelling of a folder reached twice (through a link) is kept: make it the same everywhere
        except OSError as error:
            left_out.append(LeftOut(shown_name(current), f"unreadable folder: {error.strerror or error}"))
            continue
        for entry in listed:
            name = entry.name
            if name.startswith("."):
                continue
            rel = f"{relative}/{name}" if relative else name
            try:
                is_link = entry.is_symlink()
            except OSError:
                is_link = False
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:  # a link loop, say: not a folder
                is_dir = False
            if is_dir:
                if not (is_link or follow_links):
                    pending.append(rel)
                    continue
                real = os.path.realpath(entry.path)
                if follow_links:
                    if real not in seen_folders:  # each real folder once: links cannot make the walk loop
                        seen_folders.add(real)
                        pending.append(rel)
                elif not inside(real, real_root):
                    left_out.append(LeftOut(shown_name(os.path.join(folder, rel)),
                                            f"outside the folder: a link to the folder {shown_name(real)}; "
                                            f"{FOLLOW_LINKS_HINT}"))
                continue  # without follow_links, a link to a folder inside repeats what the walk reads anyway
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not is_text_name(rel):
                left_out.append(LeftOut(shown_name(os.path.join(folder, rel)), "bad file name: not UTF-8"))
                continue
            if is_link and not follow_links:
                real = os.path.realpath(entry.path)
                if not inside(real, real_root):
                    left_out.append(LeftOut(os.path.join(folder, rel), f"outside the folder: a link to "
                                            f"{shown_name(real)}; {FOLLOW_LINKS_HINT}"))
                    continue
            found.append(rel)
    return ImageFiles([os.path.join(folder, rel) for rel in sorted(found)],
                      sorted(left_out))


def items_from_input(source: str | os.PathLike, *, boxes: str | os.PathLike | None = None,
                     follow_links: bool = False) -> EncodeInputs:
    """The items to encode from the CLI input: a folder (recursive) or a text file of paths, and
    optionally a boxes table (CSV or Parquet with ``path, x0, y0, x1, y1``; each box is one item;
    ``path`` as listed by the input or relative to the input folder; ``./a.jpg``, ``a.jpg`` and
    ``a//b.jpg``-like spellings of one file are one file). Returns the items (``path`` [, ``box``])
    and the inputs left out of them."""
    import polars as pl

    listing = find_image_files(source, follow_links=follow_links)
    files = listing.files
    if boxes is None:
        return EncodeInputs(pl.DataFrame({"path": files}, schema={"path": pl.String}), listing.left_out)
    table = _read_boxes(Path(boxes))
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    known = set(files)
    resolved = []
    for path in table["path"].to_list():
        path = os.path.normpath(path)
        candidate = path if path in known or os.path.isabs(path) else os.path.normpath(base / path)
        resolved.append(candidate)
    box_values = table.select(["x0", "y0", "x1", "y1"]).to_numpy().astype(float).tolist()
    frame = pl.DataFrame({"path": resolved, "box": box_values}, schema={"path": pl.String, "box": pl.List(pl.Float64)})
    return EncodeInputs(frame, listing.left_out)


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
    if table["path"].null_count():
        row = int(table["path"].is_null().arg_true()[0])
        raise ClipengineError(f"--boxes {path}: row {row + 1} has no path")
    return table.with_columns(pl.col("path").cast(pl.String))
