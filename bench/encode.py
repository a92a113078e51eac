"""Encode throughput: every available backend against an open_clip eager reference, same run.

    flock /tmp/clipengine-bench.lock python bench/encode.py [--images 256] [--batch-size 32] [--rounds 3] [--pairs 4] [--json]

What is measured (random-init ViT-B-32 saved as safetensors, same weights everywhere, same
threads, same batch size; each configuration in its own process):

- model only: images/s of the model on already decoded (B, 224, 224, 3) uint8 batches (one warm-up
  batch, then ``--model-batches`` timed batches); for open_clip: ``model.encode_image`` in fp32 on the
  same pixels, normalized as its own preprocess does (ToTensor + Normalize).
- end to end: JPEG files (sample photos of scikit-image, resized/cropped to 500×400..1000×800) →
  ``embeddings.npy`` on disk. clipengine: ``encode_items`` with its defaults (decode threads, bounded
  prefetch, shards). open_clip: the plain loop (PIL open + its own preprocess per image, batches,
  ``encode_image``, ``np.save``).
- peak memory: max resident set size of each configuration's process (``os.wait4`` rusage
  ``ru_maxrss`` of that child), and the process's whole wall time including start-up.
- agreement: cosine of each configuration's rows with the open_clip fp32 rows (model-only: same
  pixels; end to end: same files, so it includes clipengine's JPEG decode shortcuts).
- paired (``--pairs N``): the end-to-end ratio of the default configuration measured a second way,
  in one process, as N back-to-back pairs (open_clip's loop, clipengine's default), alternating
  which goes first; each pair's ratio comes from passes seconds apart, so the host's slow and fast
  phases hit both sides alike. The median and range of the N ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_IMAGES = 256
DEFAULT_BATCH = 32
DEFAULT_MODEL_BATCHES = 3
DEFAULT_ROUNDS = 3
DEFAULT_PAIRS = 4
CONFIGS = {  # name -> (backend, precision, device)
    "torch-fp32": ("torch", "fp32", "cpu"),
    "torch-bf16": ("torch", "bf16", "cpu"),
    "torch-bf16-module": ("torch", "bf16", "cpu"),  # bf16 through open_clip's module forward, not fused
    "onnxruntime-fp32": ("onnxruntime", "fp32", "cpu"),
    "torch-cuda-fp16": ("torch", "fp16", "cuda"),
    "tensorrt-fp16": ("tensorrt", "fp16", "cuda"),
}


# ---- data -----------------------------------------------------------------------------------
def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` JPEGs from scikit-image's sample photos at varied sizes (500×400 .. 1000×800)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB")
               for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")]
    paths = []
    for i in range(count):
        width = int(rng.integers(500, 1001))
        height = int(rng.integers(400, 801))
        source = sources[i % len(sources)]
        zoom = max(width / source.width, height / source.height) * float(rng.uniform(1.0, 1.3))
        scaled = source.resize((max(width, round(source.width * zoom)), max(height, round(source.height * zoom))))
        left = int(rng.integers(0, scaled.width - width + 1))
        top = int(rng.integers(0, scaled.height - height + 1))
        path = folder / f"img{i:05d}.jpg"
        scaled.crop((left, top, left + width, top + height)).save(path, quality=90)
        paths.append(str(path))
    return paths


def make_weights(folder: Path) -> Path:
    import open_clip
    import torch

    from clipengine.encode.models import build_open_clip_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(build_open_clip_model(open_clip.get_model_config("ViT-B-32")), folder / "ViT-B-32-random.safetensors")


def decoded_set(paths: list[str], count: int) -> np.ndarray:
    """(count, 224, 224, 3) uint8: the model-only inputs (exact decode, as open_clip's preprocess)."""
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    spec = ImageSpec(image_size=224, fast_jpeg=False, fast_resize=False)
    return np.stack([load_image(paths[i % len(paths)], None, spec) for i in range(count)])


# ---- one configuration per process ------------------------------------------------------------
def run_reference(args) -> dict:
    """open_clip eager fp32: model-only on the decoded set, then the plain JPEG → npy loop."""
    import open_clip
    import torch

    model, preprocess = load_open_clip(args)
    paths = Path(args.listing).read_text().split()
    pixels = decoded_set(paths, args.batch_size * (args.model_batches + 1))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rows = []
    with torch.no_grad():
        for b in range(args.model_batches + 1):
            batch = torch.from_numpy(pixels[b * args.batch_size:(b + 1) * args.batch_size]).permute(0, 3, 1, 2)
            batch = (batch.float() / 255.0 - mean) / std
            if b == 1:
                started = time.perf_counter()
            rows.append(model.encode_image(batch, normalize=True).numpy())
        model_seconds = time.perf_counter() - started
    np.save(Path(args.result).with_suffix(".model.npy"), np.concatenate(rows[1:]))

    e2e_seconds = open_clip_e2e(model, preprocess, paths, args.batch_size, Path(args.out_dir))
    return {"model_seconds": model_seconds, "model_images": args.batch_size * args.model_batches,
            "e2e_seconds": e2e_seconds, "e2e_images": len(paths)}


def load_open_clip(args):
    """(open_clip ViT-B-32 fp32 eval model with the bench weights, its inference preprocess)."""
    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    model = open_clip.create_model("ViT-B-32")
    open_clip.load_checkpoint(model, args.weights, weights_only=True)
    return model.eval(), open_clip.transform.image_transform(224, is_train=False)


def open_clip_e2e(model, preprocess, paths: list[str], batch_size: int, out_dir: Path) -> float:
    """Seconds of open_clip's plain loop: PIL open + its preprocess per image, batches, ``encode_image``, ``np.save``."""
    import torch
    from PIL import Image

    started = time.perf_counter()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p)) for p in paths[start:start + batch_size]])
            out.append(model.encode_image(batch, normalize=True).numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings.npy", np.concatenate(out))
    return time.perf_counter() - started


def run_clipengine(args) -> dict:
    """A clipengine backend: model-only on the decoded set, then ``encode_items`` on the files."""
    import polars as pl

    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.stage import encode_items

    backend, precision, device = CONFIGS[args.config]
    config = EncodeConfig(model=ModelConfig(model="ViT-B-32", weights=Path(args.weights)), backend=backend,
                          precision=precision, device=device, batch_size=args.batch_size, workers=args.workers,
                          progress=False)
    started = time.perf_counter()
    encoder = create_encoder(config)
    if args.config == "torch-bf16-module":  # what the fused CPU forward gains, in the same run
        record = dict(encoder.model_record)
        encoder = type(encoder)(encoder.towers, device=device, precision=precision, fused=False)
        encoder.model_record = {**record, "image_forward": encoder.image_forward}
    setup_seconds = time.perf_counter() - started
    paths = Path(args.listing).read_text().split()
    pixels = decoded_set(paths, args.batch_size * (args.model_batches + 1))
    rows = []
    for b in range(args.model_batches + 1):
        if b == 1:
            started = time.perf_counter()
        rows.append(encoder.encode_images(pixels[b * args.batch_size:(b + 1) * args.batch_size]))
    model_seconds = time.perf_counter() - started
    np.save(Path(args.result).with_suffix(".model.npy"), np.concatenate(rows[1:]))

    started = time.perf_counter()
    result = encode_items(pl.DataFrame({"path": paths}), args.out_dir, config, encoder=encoder)
    e2e_seconds = time.perf_counter() - started
    return {"model_seconds": model_seconds, "model_images": args.batch_size * args.model_batches,
            "e2e_seconds": e2e_seconds, "e2e_images": result.encoded, "setup_seconds": setup_seconds,
            "skipped": result.skipped}


def run_paired(args) -> dict:
    """The default configuration against open_clip's loop, end to end, as back-to-back pairs in this process."""
    import polars as pl

    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.stage import encode_items

    model, preprocess = load_open_clip(args)
    config = EncodeConfig(model=ModelConfig(model="ViT-B-32", weights=Path(args.weights)),
                          batch_size=args.batch_size, workers=args.workers, progress=False)
    encoder = create_encoder(config)
    paths = Path(args.listing).read_text().split()
    frame = pl.DataFrame({"path": paths})
    out_dir = Path(args.out_dir)

    def clipengine_pass() -> float:
        shutil.rmtree(out_dir / "clipengine", ignore_errors=True)  # nothing may be reused between passes
        started = time.perf_counter()
        encode_items(frame, out_dir / "clipengine", config, encoder=encoder)
        return time.perf_counter() - started

    def open_clip_pass() -> float:
        return open_clip_e2e(model, preprocess, paths, args.batch_size, out_dir / "open_clip")

    clipengine_pass()  # warm-up of both: thread pools, allocator, oneDNN primitives
    open_clip_pass()
    pairs = []
    for index in range(args.pairs):
        if index % 2:
            ours, reference = clipengine_pass(), open_clip_pass()
        else:
            reference, ours = open_clip_pass(), clipengine_pass()
        pairs.append({"open_clip_seconds": reference, "clipengine_seconds": ours})
    record = encoder.model_record
    return {"images": len(paths), "pairs": pairs, "backend": record["backend"], "precision": record["precision"],
            "image_forward": record.get("image_forward")}


def run_export(args) -> dict:
    from clipengine import envs
    from clipengine.bindings.onnx_export import ensure_image_onnx
    from clipengine.config import ModelConfig
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(ModelConfig(model="ViT-B-32", weights=Path(args.weights))))
    started = time.perf_counter()
    path = ensure_image_onnx(towers, envs.cache_dir())
    return {"export_seconds": time.perf_counter() - started, "onnx": str(path)}


# ---- orchestration --------------------------------------------------------------------------
def spawn(role: str, args, work: Path, config: str | None = None) -> dict:
    """Run one configuration in a child process; add its wall time and peak RSS."""
    name = config or role
    result = work / f"{name}.json"
    out_dir = work / f"out-{name}"
    command = [sys.executable, __file__, "--role", role, "--result", str(result), "--out-dir", str(out_dir),
               "--weights", str(args.weights), "--listing", str(args.listing), "--batch-size", str(args.batch_size),
               "--model-batches", str(args.model_batches), "--threads", str(args.threads), "--pairs", str(args.pairs)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if config:
        command += ["--config", config]
    env = {**os.environ, "CLIPENGINE_NUM_THREADS": str(args.threads), "CLIPENGINE_CACHE_DIR": str(work / "cache")}
    log = work / f"{name}.stderr"
    started = time.perf_counter()
    with open(log, "w") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        lines = log.read_text().strip().splitlines()
        return {"name": name, "error": lines[-1] if lines else f"exit {process.returncode}"}
    record = json.loads(result.read_text())
    record.update(name=name, process_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    return record


def available_configs() -> list[str]:
    import importlib.util

    cuda = Path("/dev/nvidiactl").exists()
    names = ["torch-fp32", "torch-bf16", "torch-bf16-module"]
    if importlib.util.find_spec("onnxruntime"):
        names.append("onnxruntime-fp32")
    if cuda:
        names.append("torch-cuda-fp16")
        if importlib.util.find_spec("tensorrt"):
            names.append("tensorrt-fp16")
    return names


def default_config_name() -> str:
    from clipengine import bindings

    device = "cuda" if Path("/dev/nvidiactl").exists() else "cpu"
    backend = bindings.select_backend(device)
    precision = bindings.default_precision(backend, device)
    prefix = "torch-cuda" if backend == "torch" and device == "cuda" else backend
    return f"{prefix}-{precision}"


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def orchestrate(args) -> dict:
    threads = args.threads
    with tempfile.TemporaryDirectory(prefix="clipengine-bench-encode-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        paths = make_jpegs(work / "jpegs", args.images)
        args.weights = make_weights(work)
        args.listing = work / "files.txt"
        args.listing.write_text("\n".join(paths))
        prepare_seconds = time.perf_counter() - started
        configs = args.configs.split(",") if args.configs else available_configs()
        report = {
            "images": args.images, "batch_size": args.batch_size, "threads": threads,
            "model": "ViT-B-32 (random init, safetensors)", "default_config": default_config_name(),
            "peak_memory": "max RSS of each configuration's own process (os.wait4 ru_maxrss)",
            "prepare_seconds": prepare_seconds, "results": [],
        }
        if "onnxruntime-fp32" in configs:
            export = spawn("export", args, work)
            report["onnx_export_seconds"] = export.get("export_seconds")
        # Rounds: the reference and every configuration once per round, and each ratio taken within
        # its round, so that the VM's slow phases (steal time) hit both sides of a ratio alike.
        rounds: list[dict[str, dict]] = []
        for _ in range(args.rounds):
            records = {"open_clip-eager-fp32": spawn("reference", args, work)}
            if "error" in records["open_clip-eager-fp32"]:
                report["results"].append({**records["open_clip-eager-fp32"], "name": "open_clip-eager-fp32"})
                return report
            ref_model = np.load(work / "reference.model.npy")
            ref_e2e = np.load(work / "out-reference" / "embeddings.npy")
            for config in configs:
                record = spawn("clipengine", args, work, config)
                if "error" not in record:
                    record["model_cosine_min"] = cosine_min(np.load(work / f"{config}.model.npy"), ref_model)
                    e2e = np.load(work / f"out-{config}" / "embeddings.npy")
                    record["e2e_cosine_min"] = cosine_min(e2e, ref_e2e) if e2e.shape == ref_e2e.shape else None
                    shutil.rmtree(work / f"out-{config}")  # the next round encodes from scratch again
                records[config] = record
            rounds.append(records)
        report["rounds"] = rounds
        if args.pairs:
            report["paired"] = summarize_pairs(spawn("paired", args, work))
        for name in rounds[0]:
            per_round = [r[name] for r in rounds if "error" not in r[name]]
            if not per_round:
                report["results"].append(rounds[0][name])
                continue
            refs = [r["open_clip-eager-fp32"] for r in rounds if "error" not in r[name]]
            model_rates = [x["model_images"] / x["model_seconds"] for x in per_round]
            e2e_rates = [x["e2e_images"] / x["e2e_seconds"] for x in per_round]
            record = {**per_round[0], "name": name,
                      "model_img_s": float(np.median(model_rates)), "e2e_img_s": float(np.median(e2e_rates)),
                      "model_ratio": float(np.median([rate / (ref["model_images"] / ref["model_seconds"])
                                                      for rate, ref in zip(model_rates, refs)])),
                      "e2e_ratio": float(np.median([rate / (ref["e2e_images"] / ref["e2e_seconds"])
                                                    for rate, ref in zip(e2e_rates, refs)])),
                      "e2e_ratio_range": [min(rate / (ref["e2e_images"] / ref["e2e_seconds"]) for rate, ref in zip(e2e_rates, refs)),
                                          max(rate / (ref["e2e_images"] / ref["e2e_seconds"]) for rate, ref in zip(e2e_rates, refs))],
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in per_round),
                      "process_seconds": float(np.median([x["process_seconds"] for x in per_round]))}
            for key in ("model_cosine_min", "e2e_cosine_min"):
                values = [x[key] for x in per_round if x.get(key) is not None]
                if values:
                    record[key] = min(values)
            report["results"].append(record)
    return report


def summarize_pairs(record: dict) -> dict:
    """Add each pair's end-to-end ratio (open_clip seconds / clipengine seconds), their median and range."""
    if "error" in record:
        return record
    ratios = [p["open_clip_seconds"] / p["clipengine_seconds"] for p in record["pairs"]]
    return {**record, "ratios": ratios, "e2e_ratio": float(np.median(ratios)), "e2e_ratio_range": [min(ratios), max(ratios)]}


def print_table(report: dict) -> None:
    print(f"ViT-B-32 encode, {report['images']} JPEGs (500×400..1000×800), batch {report['batch_size']}, "
          f"{report['threads']} threads; default here: {report['default_config']}; "
          f"medians of {len(report.get('rounds', [])) or 1} rounds, each ratio within its round")
    if report.get("onnx_export_seconds") is not None:
        print(f"ONNX export (once, cached): {report['onnx_export_seconds']:.1f} s")
    header = f"{'configuration':<22}{'model img/s':>12}{'×ref':>7}{'e2e img/s':>11}{'×ref':>7}{'process s':>11}{'peak MB':>9}{'cos model':>11}{'cos e2e':>9}"
    print(header)
    for r in report["results"]:
        if "error" in r:
            print(f"{r['name']:<22} failed: {r['error']}")
            continue
        cos_m = f"{r['model_cosine_min']:.5f}" if "model_cosine_min" in r else "ref"
        cos_e = f"{r['e2e_cosine_min']:.5f}" if r.get("e2e_cosine_min") is not None else "ref"
        print(f"{r['name']:<22}{r['model_img_s']:>12.1f}{r['model_ratio']:>7.2f}{r['e2e_img_s']:>11.1f}{r['e2e_ratio']:>7.2f}"
              f"{r['process_seconds']:>11.1f}{r['peak_rss_mb']:>9.0f}{cos_m:>11}{cos_e:>9}")
    for r in report["results"]:
        if "e2e_ratio_range" in r and r["name"] != "open_clip-eager-fp32":
            low, high = r["e2e_ratio_range"]
            print(f"{r['name']}: end-to-end ratio over the rounds {low:.2f}–{high:.2f}×")
    paired = report.get("paired")
    if paired and "error" in paired:
        print(f"paired passes failed: {paired['error']}")
    elif paired:
        low, high = paired["e2e_ratio_range"]
        print(f"paired, one process, {len(paired['ratios'])} back-to-back pairs of end-to-end passes "
              f"(default {paired['backend']} {paired['precision']} against open_clip's loop): "
              f"median {paired['e2e_ratio']:.2f}× (range {low:.2f}–{high:.2f}×)")
    print(f"peak memory: {report['peak_memory']}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="JPEG files for end to end [256]")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="batch size everywhere [32]")
    parser.add_argument("--model-batches", type=int, default=DEFAULT_MODEL_BATCHES, help="timed model-only batches [3]")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds of (reference, every configuration); medians reported [3]")
    parser.add_argument("--threads", type=int, default=None, help="compute threads [all cores]")
    parser.add_argument("--workers", type=int, default=None, help="clipengine decode workers [its default]")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                        help="back-to-back end-to-end pairs (open_clip, default) in one process; 0: none [4]")
    parser.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} [all available]")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    # worker mode (internal)
    parser.add_argument("--role", choices=["reference", "clipengine", "export", "paired"], default=None,
                        help=argparse.SUPPRESS)
    for name in ("--config", "--result", "--out-dir", "--weights", "--listing"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.role:
        runner = {"reference": run_reference, "clipengine": run_clipengine, "export": run_export, "paired": run_paired}[args.role]
        record = runner(args)
        Path(args.result).write_text(json.dumps(record))
        return 0
    report = orchestrate(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
