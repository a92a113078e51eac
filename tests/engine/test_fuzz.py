"""Fuzz pass (slow suite): generated bad files, tables and schemas through ``encode``, ``slices``,
``annotate`` and ``run`` as real CLI processes.

Every process must end with exit code 0, 1 or 2, no traceback and no warning (a failure says one line),
within a time limit, with a peak memory (printed) under a bound; nothing may be written outside the
output folders and the cache: the inputs are unchanged, and the working folder, home and temporary
folder stay empty.

``CLIPENGINE_FUZZ_CASES`` sets how many inputs are generated (default 2000: about 85 % image files,
the rest tables, schemas and whole runs); ``CLIPENGINE_FUZZ_SEED`` the generator's seed. The run
takes a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.filesystem import remove_tree

pytestmark = pytest.mark.slow

CASES = int(os.environ.get("CLIPENGINE_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("CLIPENGINE_FUZZ_SEED", "14"))
PROCESS_TIMEOUT = 300  # seconds; a process still going then is unbounded work
PEAK_RSS_LIMIT = 3 << 30
DEEP_LEVELS = 1100
REPO = Path(__file__).resolve().parents[2]


# ---- the sandbox ------------------------------------------------------------------------------
@dataclass
class Sandbox:
    root: Path

    def __post_init__(self):
        for name in ("inputs", "outs", "cache", "home", "cwd", "tmp", "outside"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str) -> Path:
        if name in ("inputs", "outs", "cache", "home", "cwd", "tmp", "outside"):
            return self.root / name
        raise AttributeError(name)

    def env(self) -> dict:
        cache = self.cache
        return {**os.environ, "HOME": str(self.home), "TMPDIR": str(self.tmp), "XDG_CACHE_HOME": str(cache / "xdg"),
                "CLIPENGINE_CACHE_DIR": str(cache / "clipengine"), "NUMBA_CACHE_DIR": str(cache / "numba"),
                "MPLCONFIGDIR": str(cache / "matplotlib"), "PYTHONDONTWRITEBYTECODE": "1",
                "CLIPENGINE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                "CLIPENGINE_NUM_THREADS": "1"}


@dataclass
class Outcome:
    args: list
    returncode: int
    stderr: str
    seconds: float
    peak_rss: int


# A process started from this one reports this process's peak memory as its own: subprocess starts children
# with vfork, and Linux keeps the old address space's high-water mark across exec. After an earlier test
# grew this process (a slow run holds PyPI sliceline's 15 GB), every child would read as that large. So a
# small launcher starts clipengine and reads its peak with wait4.
_LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_cli(sandbox: Sandbox, args: list) -> Outcome:
    """``clipengine *args`` in the sandbox, started by :data:`_LAUNCHER`, which reads its own peak memory."""
    args = [os.fsencode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args]
    stderr_path = sandbox.root / f"stderr-{threading.get_ident()}.txt"
    report = sandbox.root / f"usage-{threading.get_ident()}.txt"
    started = time.perf_counter()
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), sys.executable, "-m", "clipengine",
                                    *args], cwd=sandbox.cwd, env=sandbox.env(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        timer = threading.Timer(PROCESS_TIMEOUT, lambda: os.killpg(process.pid, signal.SIGKILL))
        timer.start()
        try:
            process.wait()
        finally:
            timer.cancel()
    returncode, peak_kib = process.returncode, 0
    if report.exists():  # absent when the timer killed the launcher and its child
        code, peak = report.read_text().split()
        returncode, peak_kib = int(code), int(peak)
        report.unlink()
    text = stderr_path.read_bytes().decode("utf-8", "replace")
    stderr_path.unlink()
    return Outcome([os.fsdecode(a) for a in args], returncode, text, time.perf_counter() - started, peak_kib * 1024)


def digest_tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (no link followed) → a digest of what it is."""
    out = {}
    pending = [os.fsencode(folder)]
    while pending:
        current = pending.pop()
        for entry in os.scandir(current):
            key = os.fsdecode(entry.path)
            if entry.is_symlink():
                out[key] = "link:" + os.fsdecode(os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                out[key] = "dir"
                pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as handle:
                    out[key] = hashlib.sha256(handle.read()).hexdigest()
            else:
                out[key] = "special"
    return out


# ---- generators -------------------------------------------------------------------------------
FORMATS = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1"),
           ("PNG", "I;16"), ("PNG", "LA"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "I;16"),
           ("GIF", "P"), ("PPM", "RGB"), ("ICO", "RGB"), ("PCX", "RGB"), ("TGA", "RGB")]
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"P6\n", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"%PDF-1.4\n", b"\x00\x00\x01\x00", b"\xc5\xd0\xd3\xc6"]
EXTENSIONS = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
              ".pnm", ".eps", ".txt", ""]
HOSTILE_TEXT = ["<b>bold</b>", "a|b", "# heading", "x\ny", "';DROP TABLE t;--", "../../etc/passwd", "ünïcødé",
                "\u202eevil", "$(touch pwned)", "%s%n", "`code`", "*emph*", "", " ", "-1", "nan", "inf", "None"]


def image_bytes(rng: random.Random, fmt: str, mode: str) -> bytes:
    from PIL import Image

    width, height = rng.randint(1, 48), rng.randint(1, 48)
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    try:
        image = image.convert(mode) if mode != "I;16" else Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_image(rng: random.Random) -> bytes:
    """One generated image file: valid, truncated, bit-flipped, a header promising billions of pixels,
    garbage behind a format's magic, PostScript, text or nothing."""
    kind = rng.choice(["valid", "truncated", "flipped", "flipped", "magic", "bomb", "postscript", "text", "empty"])
    if kind == "empty":
        return b""
    if kind == "text":
        return rng.choice(HOSTILE_TEXT).encode() * rng.randint(1, 50)
    if kind == "postscript":
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
    if kind == "magic":
        return rng.choice(MAGIC) + rng.randbytes(rng.randint(0, 400))
    if kind == "bomb":
        import struct
        import zlib

        width, height = rng.choice([(100_000, 100_000), (1, 10**9), (65_535, 65_535)])
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + header
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
                + rng.randbytes(64))
    data = image_bytes(rng, *rng.choice(FORMATS))
    if kind == "truncated":
        return data[: rng.randint(1, max(1, len(data) - 1))]
    if kind == "flipped":
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return data


def file_name(rng: random.Random, index: int) -> bytes:
    stem = f"{index:05d}".encode()
    decoration = rng.choice([b"", b"", b"\xff\xfe", b"caf\xe9", b" ", b"-x", "ünï".encode(), b"<b>x<b>", b"'q\"",
                             b"\n", b"a" * rng.randint(100, 200), b"#", b"%"])
    return stem + decoration + rng.choice(EXTENSIONS).encode()


def write_images(rng: random.Random, folder: Path, count: int, outside: Path) -> None:
    """``count`` generated files in nested (sometimes hidden) folders, plus the entries a folder walk
    meets in the wild: a folder named like an image, links out of the folder, a broken link, a link
    loop, a FIFO, and a chain of folders deeper than Python's recursion limit."""
    base = os.fsencode(folder)
    subfolders = [b""] + [os.path.join(*[rng.choice([b"a", b"b", b".hidden", b"c\xff", "d ü".encode()])
                                         for _ in range(rng.randint(1, 3))]) for _ in range(12)]
    for index in range(count):
        where = os.path.join(base, rng.choice(subfolders))
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, file_name(rng, index)), "wb") as handle:
            handle.write(bad_image(rng))
    os.makedirs(os.path.join(base, b"a folder.jpg"), exist_ok=True)
    (outside / "secret.png").write_bytes(image_bytes(rng, "PNG", "RGB"))
    os.symlink(outside / "secret.png", os.path.join(base, b"leak.png"))
    os.symlink(outside, os.path.join(base, b"away"))
    os.symlink("/dev/zero", os.path.join(base, b"zero.jpg"))
    os.symlink(os.path.join(base, b"missing.png"), os.path.join(base, b"broken.png"))
    os.symlink(b"loop2.jpg", os.path.join(base, b"loop1.jpg"))
    os.symlink(b"loop1.jpg", os.path.join(base, b"loop2.jpg"))
    os.symlink(base, os.path.join(base, b"self"))
    os.mkfifo(os.path.join(base, b"fifo.jpg"))
    path = os.path.join(base, b"deep")
    os.mkdir(path)
    for _ in range(DEEP_LEVELS):
        path = os.path.join(path, b"d")
        os.mkdir(path)
    with open(os.path.join(path, b"bottom.png"), "wb") as handle:
        handle.write(image_bytes(rng, "PNG", "RGB"))


def random_column(rng: random.Random, n: int):
    kind = rng.choice(["strings", "hostile", "ints", "floats", "specials", "bools", "constant", "nulls", "long"])
    gen = np.random.default_rng(rng.randrange(1 << 30))
    if kind == "strings":
        return [rng.choice(["a", "b", "c", "d"]) for _ in range(n)]
    if kind == "hostile":
        return [rng.choice(HOSTILE_TEXT) for _ in range(n)]
    if kind == "ints":
        return gen.integers(-5, rng.choice([3, 10, 1000]), n).tolist()
    if kind == "floats":
        return (gen.normal(size=n) * 10 ** rng.randint(-3, 300)).tolist()
    if kind == "specials":
        return [rng.choice([1.0, 2.5, float("inf"), float("-inf"), float("nan"), -0.0, 1e308, None]) for _ in range(n)]
    if kind == "bools":
        return [rng.choice([True, False, None]) for _ in range(n)]
    if kind == "constant":
        return [7] * n
    if kind == "nulls":
        return [None] * n
    return ["x" * rng.randint(0, 3000) for _ in range(n)]


def error_column(rng: random.Random, n: int, *, valid: bool = False):
    gen = np.random.default_rng(rng.randrange(1 << 30))
    kind = "binary" if valid else rng.choice(["binary", "binary", "binary", "floats", "negative", "nan", "inf", "huge",
                                              "strings", "bools", "empty"])
    if kind == "binary":
        return gen.integers(0, 2, n).tolist()
    if kind == "floats":
        return gen.random(n).tolist()
    if kind == "negative":
        return (gen.random(n) - 0.1).tolist()
    if kind == "nan":
        return [float("nan") if i % 7 == 0 else 1.0 for i in range(n)]
    if kind == "inf":
        return [float("inf") if i % 9 == 0 else 0.0 for i in range(n)]
    if kind == "huge":
        return [1e308] * n
    if kind == "strings":
        return [rng.choice(["yes", "no", "1", "0", ""]) for _ in range(n)]
    if kind == "bools":
        return [rng.random() < 0.3 for _ in range(n)]
    return [None] * n


def random_table(rng: random.Random, path: Path, *, paths: list[str] | None = None, valid: bool = False) -> Path:
    """A CSV/Parquet errors table, broken in one of many ways (or, ``valid``, only odd in its feature
    columns)."""
    n = rng.choice([0, 1, 2, 5, 30, 120, 200]) if paths is None else len(paths)
    columns = {}
    if paths is not None:
        columns["path"] = paths
    columns["error"] = error_column(rng, n, valid=valid)
    for _ in range(rng.randint(0, 6)):
        odd = ["road", "ünï", "<b>c</b>", "a|b", "# h", f"f{rng.randrange(100)}"]
        name = rng.choice(odd if valid else odd + ["weather", "given_weather", "scene", "given_scene", "scene_prob",
                                                   "true_scene", "error", "path", "box", "", " "])
        columns[name if name not in columns else name + "_2"] = random_column(rng, n)
    try:
        frame = pl.DataFrame(columns, strict=False)
    except Exception:
        frame = pl.DataFrame({"error": [0, 1]})
    corruption = "none" if valid else rng.choice(["none", "none", "none", "parquet", "truncate", "junk",
                                                  "header-only", "ragged", "bom"])
    if corruption == "parquet":
        path = path.with_suffix(".parquet")
        frame.write_parquet(path)
        if rng.random() < 0.3:
            data = bytearray(path.read_bytes())
            data[rng.randrange(len(data))] ^= 0xFF
            path.write_bytes(bytes(data))
        return path
    try:
        frame.write_csv(path)
    except Exception:
        path.write_text("error\n1\n0\n")
    if corruption == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randint(0, len(data))])
    elif corruption == "junk":
        path.write_bytes(rng.randbytes(rng.randint(0, 2000)))
    elif corruption == "header-only":
        path.write_text(path.read_text().splitlines()[0] + "\n" if path.read_text() else "")
    elif corruption == "ragged":
        path.write_text(path.read_text() + "1,2,3,4,5,6,7,8,9\n,,\n")
    elif corruption == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return path


VALID_SCHEMA = """name: fuzz
templates: ["a photo of {}"]
attributes:
  scene:
    classes:
      urban: [city, street]
      rural: [field, farm]
  tone:
    type: exclusive
    classes:
      bright: {prompts: ["a bright photo"]}
      dark: {prompts: ["a dark photo"]}
      grey: [grey]
"""


def random_schema(rng: random.Random, path: Path) -> Path:
    """A schema: the valid one mutated (keys dropped, values replaced by hostile ones), alias bombs,
    deep nesting, huge expansions, or bytes."""
    kind = rng.choice(["mutated", "mutated", "mutated", "valid-odd", "laughs", "deep", "expansion", "bytes",
                       "recursive"])
    if kind == "bytes":
        path.write_bytes(rng.randbytes(rng.randint(0, 600)))
        return path
    if kind == "laughs":
        levels = rng.randint(5, 12)
        lines = ["l0: &l0 [" + ", ".join(["ha"] * 10) + "]"] + [
            f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
        path.write_text("\n".join(lines) + f"\nattributes:\n  a:\n    templates: ['{{}}']\n    classes:\n"
                                           f"      x: *l{levels - 1}\n      y: [y]\n")
        return path
    if kind == "deep":
        depth = rng.randint(50, 5000)
        path.write_text("attributes: " + "[" * depth + "]" * depth + "\n")
        return path
    if kind == "recursive":
        path.write_text("attributes: &a\n  x: {classes: *a}\n")
        return path
    if kind == "expansion":  # past the prompt limit, or small (encoding 100,000 prompts is legitimate work)
        big = rng.random() < 0.7
        templates = [f"t{i} {{}}" for i in range(rng.randint(400, 600) if big else rng.randint(1, 40))]
        fills = [f"f{i}" for i in range(rng.randint(300, 600) if big else rng.randint(1, 50))]
        path.write_text("attributes:\n  a:\n    templates: [" + ", ".join(f"'{t}'" for t in templates) + "]\n"
                        "    classes:\n      x: [" + ", ".join(fills) + "]\n      y: [y]\n")
        return path
    if kind == "valid-odd":
        name = rng.choice(["../../../escaped", "a/b", "<b>x</b>", "x" * 150, "ünï"])
        cls = rng.choice(["<b>round</b>", "a|b", "yes", "1", "ünï"])
        path.write_text(f"name: {name!r}\nattributes:\n  shape:\n    classes:\n      {cls!r}: {{prompts: ['a round thing']}}\n"
                        "      square: {prompts: ['a square thing']}\n")
        return path
    lines = VALID_SCHEMA.splitlines()
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(len(lines))
        action = rng.choice(["drop", "replace", "duplicate", "indent"])
        if action == "drop":
            lines.pop(index)
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif action == "indent":
            lines[index] = " " * rng.randint(0, 9) + lines[index].lstrip()
        else:
            key = lines[index].split(":")[0]
            value = rng.choice(["", "null", "[]", "{}", "42", "true", "'a\\0b'", '"\\x00"', "error", "[1, [2, [3]]]",
                                "!!python/object/apply:os.system ['touch pwned']", "*nowhere", "&a x", "'{}{}'"])
            lines[index] = f"{key}: {value}"
        if not lines:
            break
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the pass ---------------------------------------------------------------------------------
@pytest.fixture
def sandbox():
    top = Path(tempfile.mkdtemp(prefix="clipengine-fuzz-"))
    try:
        yield Sandbox(top)
    finally:
        remove_tree(top)


def test_fuzzed_inputs_through_the_cli(sandbox, tiny_clip):
    rng = random.Random(SEED)
    n_files = int(CASES * 0.85)
    n_tables = max(6, CASES // 60)
    n_schemas = max(6, CASES // 40)
    n_runs = max(2, CASES // 400)
    model = ["--model", tiny_clip.config_path, "--weights", tiny_clip.weights_path, "--backend", "torch",
             "--precision", "fp32", "--device", "cpu"]
    inputs, outs = sandbox.inputs, sandbox.outs

    images = inputs / "images"
    images.mkdir()
    write_images(rng, images, n_files, sandbox.outside)
    listing = inputs / "list.txt"
    listing.write_bytes(b"\n".join([b"/dev/zero", b"/proc/self/mem", b"missing.png", b"images", b"# comment", b"",
                                    b"images/fifo.jpg", b"../../../etc/hostname", b"images/leak.png"]) + b"\n")
    boxes = inputs / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\n" + "\n".join(
        f"{rng.choice(['images/leak.png', './images/zero.jpg', 'missing.png', 'images/fifo.jpg', 'images/deep'])},"
        f"{rng.choice(['0.0', '-5.5', '1e308', 'inf', '3.0'])},{rng.choice(['0.0', '2.0', '-1.0'])},"
        f"{rng.choice(['10.0', '0.0', '1e9', '-inf'])},{i + rng.choice([0.5, 5.0, float('inf')])}" for i in range(40)) + "\n")

    run_root = inputs / "run_root"
    run_root.mkdir()
    names = [f"img{index:02d}.png" for index in range(24)]
    for index, name in enumerate(names):
        (run_root / name).write_bytes(image_bytes(rng, "PNG", "RGB") if index % 4 else bad_image(rng))
    os.symlink(sandbox.outside / "secret.png", run_root / "leak.png")
    tables = [random_table(rng, inputs / f"table{i:03d}.csv") for i in range(n_tables)]
    schemas = [random_schema(rng, inputs / f"schema{i:03d}.yaml") for i in range(n_schemas)]
    run_tables = []
    for i in range(n_runs):  # the first is valid but for odd columns and spellings; the others anything
        spell = (lambda name: rng.choice([name, f"./{name}", name.replace("img", "./img")])) if i == 0 else (
            lambda name: rng.choice([name] * 20 + [f"{name}/", f"/{name}", f"../{name}", "", "leak.png", "missing.png"]))
        run_tables.append(random_table(rng, inputs / f"errors{i:03d}.csv", paths=[spell(n) for n in names],
                                       valid=i == 0))
    (inputs / "good.yaml").write_text(VALID_SCHEMA)
    before_inputs = digest_tree(inputs)
    before_repo = {folder: digest_tree(REPO / folder) for folder in ("engine", "kernels", "bindings")}
    print(f"\nfuzz: seed {SEED}, {n_files} image files, {n_tables} tables, {n_schemas} schemas, {n_runs} runs")

    outcomes: list[Outcome] = []
    emb = outs / "emb"
    outcomes.append(run_cli(sandbox, ["encode", images, "--out", emb, *model, "--quiet"]))
    jobs = [["encode", images, "--out", outs / "emb-followed", *model, "--follow-links", "--quiet"],
            ["encode", listing, "--out", outs / "emb-list", *model, "--quiet"],
            ["encode", inputs, "--out", outs / "emb-boxes", "--boxes", boxes, *model, "--quiet"]]
    for i, table in enumerate(tables):
        options = rng.choice([[], ["--max-level", "1"], ["--bins", str(rng.randint(2, 30))], ["--min-sup", "1"],
                              ["--k", "3", "--drop-nulls"], ["--error", "nothere"], ["--json"]])
        error = [] if "--error" in options else ["--error", "error"]
        jobs.append(["slices", table, *error, *options, "--quiet", "--out", outs / f"slices{i:03d}"])
    for i, schema in enumerate(schemas):
        jobs.append(["annotate", emb, "--schema", schema, "--out", outs / f"annotate{i:03d}" / "metadata.parquet",
                     "--quiet"])
    for i, table in enumerate(run_tables):
        schema = inputs / "good.yaml" if i == 0 else rng.choice([inputs / "good.yaml", *schemas])
        jobs.append(["run", "--dataset", "folder", "--root", run_root, "--errors", table, "--schema", schema,
                     "--out", outs / f"run{i:03d}", *model, "--min-sup", "2", "--quiet"])
    jobs.append(["run", "--dataset", "folder", "--root", run_root, "--errors", run_tables[0], "--out", outs / "run-config",
                 "--config", schemas[0], "--quiet"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes += list(pool.map(lambda job: run_cli(sandbox, job), jobs))

    problems = []
    for outcome in outcomes:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        one_line = len(lines) == 1 and lines[0].startswith("clipengine: error:")
        usage = outcome.returncode == 2 and lines and lines[-1].startswith("Error:")  # click's own usage errors
        if (outcome.returncode not in (0, 1, 2) or "Traceback" in outcome.stderr or "Warning: " in outcome.stderr
                or (outcome.returncode and not (one_line or usage))):
            shown = [f"{a}: {Path(a).read_bytes()[:300]!r}" for a in outcome.args
                     if a.startswith(str(inputs)) and Path(a).is_file()]  # the generated input, to replay it
            problems.append(f"exit {outcome.returncode} after {outcome.seconds:.0f} s: clipengine "
                            f"{' '.join(outcome.args)[:300]}\n{outcome.stderr[-3000:]}\n" + "\n".join(shown))
    by_command: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_command.setdefault(outcome.args[0], []).append(outcome)
    for command, group in by_command.items():
        codes = {code: sum(o.returncode == code for o in group) for code in sorted({o.returncode for o in group})}
        print(f"fuzz: {command:<8} {len(group):>3} processes, exit codes {codes}, peak RSS "
              f"{max(o.peak_rss for o in group) / 2**20:.0f} MiB, longest {max(o.seconds for o in group):.1f} s")
    messages = sorted({(o.args[0], (o.stderr.strip().splitlines() or [""])[-1][:160]) for o in outcomes if o.returncode})
    for command, message in messages:
        print(f"fuzz: {command:<8} {message}")
    peak = max(o.peak_rss for o in outcomes)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"fuzz: peak RSS of any process {peak / 2**20:.0f} MiB (all children: {children / 2**20:.0f} MiB)")
    assert not problems, "\n\n".join(problems)
    assert peak < PEAK_RSS_LIMIT

    assert digest_tree(inputs) == before_inputs, "an input was changed"
    assert {folder: digest_tree(REPO / folder) for folder in before_repo} == before_repo, "the package was written to"
    for folder in (sandbox.cwd, sandbox.home, sandbox.tmp):
        assert not digest_tree(folder), (folder, sorted(digest_tree(folder))[:5])
    assert sorted(digest_tree(sandbox.outside)) == [str(sandbox.outside / "secret.png")]
    skipped = pl.read_parquet(emb / "skipped.parquet")
    reasons = skipped["reason"].str.split(":").list.first().value_counts().sort("count", descending=True)
    print("fuzz: encode skip reasons " + ", ".join(f"{r} {c}" for r, c in reasons.rows()))
    assert skipped.height + pl.read_parquet(emb / "items.parquet").height >= n_files // 4
