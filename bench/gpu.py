"""The GPU check: gpu tests, encoder throughput against open_clip, labelling and search over 10M rows.

    python -m clipengine.bench.gpu [--quick] [--json OUT.json]      (or: clipengine bench gpu)

Runs on one CUDA GPU in under 8 minutes and prints one table (GPU, driver, CPU, cores and date above it):

1. ``pytest -m gpu`` over the repository's tests (when run from a source checkout).
2. For ViT-B/32 and ViT-L/14 (random-init weights saved as safetensors: no download), every GPU backend
   present (torch always; tensorrt when it imports) against open_clip on the same GPU at its best
   (fp16 autocast, eager):
   - model only: images/s on decoded (B, 224, 224, 3) uint8 batches (clipengine: the encoder's
     ``encode_images``, host→device copy of the uint8 batch included; open_clip: ``encode_image`` on
     normalized float tensors already on the GPU). Build/compile time once, beside it (cold).
   - JPEG → embedding: images/s from JPEG files to normalized rows in host memory (clipengine: the
     ``clipengine encode`` command in a fresh process, cold, and ``encode_items`` with the encoder made,
     warm, both with ``--decode auto``: JPEGs decoded by nvJPEG on the GPU, the note says what model.json
     recorded; open_clip: its own preprocess in a ``DataLoader`` with one worker per core, pinned memory,
     fp16 autocast).
   - agreement: the lowest cosine between each backend's rows and open_clip fp32 rows of the same pixels.
3. Labelling of 10M stored embeddings (512-d float32, in host memory) with ``label_segments`` on the GPU
   against a GEMM + softmax reference written with torch on the same GPU; label agreement beside it.
4. Search: 16 queries over the 10M rows with ``topk_search`` on the GPU (exact; the first call copies
   the rows to the device, later calls reuse them) against ``torch.topk`` of a torch GEMM on the same
   resident rows; equality of the returned rows beside it.

Targets on an H200 (for the record): ViT-B/32 model only ≥ 30,000 img/s, JPEG → embedding ≥ 8,000
img/s, ≥ 3× open_clip fp16 eager.
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
import traceback
from pathlib import Path

import numpy as np

MODELS = ("ViT-B-32", "ViT-L-14")
MODEL_BATCH = 512
MODEL_ROUNDS = {"ViT-B-32": 20, "ViT-L-14": 6}
JPEG_COUNT = 8192
JPEG_BATCH = 256
LABEL_ROWS = 10_000_000
SEARCH_QUERIES = 16
SEARCH_K = 20
EMBED_DIM = 512
GPU_TEST_SECONDS = 150


def machine() -> dict:
    import torch

    from clipengine.bench._machine import machine_record

    record = {**machine_record(), "torch": torch.__version__}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                      capability=f"sm{properties.major}{properties.minor}")
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    for name in ("cupy", "tensorrt", "open_clip"):
        try:
            record[name] = __import__(name).__version__
        except Exception:
            record[name] = None
    return record


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


# ---- 1. the gpu-marked tests ------------------------------------------------------------------
def run_gpu_tests(rows: list[dict]) -> None:
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not tests.is_dir():
        rows.append({"check": "pytest -m gpu", "result": "no tests/ beside the package (not a source checkout)"})
        return
    # only the files that hold gpu tests: the others may import packages a GPU machine lacks (playwright, ray)
    files = sorted(str(path) for path in tests.rglob("test_*.py") if "mark.gpu" in path.read_text(encoding="utf-8"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--no-header",
               "-W", "ignore::DeprecationWarning", *files]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=GPU_TEST_SECONDS,
                              cwd=tests.parent)
        tail = [line for line in done.stdout.splitlines() if line.strip()][-12:]
        summary = tail[-1] if tail else done.stderr.strip()[-200:]
        rows.append({"check": "pytest -m gpu", "result": summary, "ok": done.returncode == 0})
        if done.returncode != 0:
            print("\n".join(tail), file=sys.stderr)
    except subprocess.TimeoutExpired:
        rows.append({"check": "pytest -m gpu", "result": f"stopped after {GPU_TEST_SECONDS} s", "ok": False})


# ---- 2. encoders --------------------------------------------------------------------------------
def gpu_backends() -> list[str]:
    from clipengine import bindings

    return ["torch"] + (["tensorrt"] if bindings.backend_imports("tensorrt") else [])


def make_model(name: str, folder: Path):
    import open_clip
    import torch

    from clipengine.config import ModelConfig
    from clipengine.encode.models import build_open_clip_model, save_checkpoint

    torch.manual_seed(0)
    weights = save_checkpoint(build_open_clip_model(open_clip.get_model_config(name)), folder / f"{name}.safetensors")
    return ModelConfig(model=name, weights=weights)


def open_clip_model(config, dtype=None):
    import open_clip

    model = open_clip.create_model(config.model, pretrained=None)
    open_clip.load_checkpoint(model, str(config.weights), weights_only=True)
    model = model.eval().requires_grad_(False).to("cuda")
    return model.to(dtype) if dtype is not None else model


def model_only(name: str, config, pixels: np.ndarray, rows: list[dict], cache: Path) -> None:
    import torch

    from clipengine.bindings import load_backend
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(config))
    mean = torch.tensor(towers.mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(towers.std, device="cuda").view(1, 3, 1, 1)
    device_pixels = ((torch.from_numpy(pixels).cuda().permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()
    peer = open_clip_model(config)
    rounds = MODEL_ROUNDS[name]
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(peer.encode_image(device_pixels[:64]), dim=-1).cpu().numpy()

        def peer_pass():
            with torch.autocast("cuda", dtype=torch.float16):
                for _ in range(rounds):
                    peer.encode_image(device_pixels)
            torch.cuda.synchronize()

        peer_pass()  # warm-up (cuBLAS/cuDNN plans)
        _, seconds = timed(peer_pass)
    peer_rate = rounds * len(pixels) / seconds
    rows.append({"check": "model only", "model": name, "backend": "open_clip fp16 autocast", "img_s": peer_rate})
    peer = None  # frees its GPU memory (the closure above is done with it)
    torch.cuda.empty_cache()
    for backend in gpu_backends():
        try:
            encoder, cold = timed(load_backend(backend), towers, device="cuda", precision="fp16", cache_dir=cache)
            _, first = timed(encoder.encode_images, pixels)  # compiles / captures every bucket it needs
            agreement = cosine_min(encoder.encode_images(pixels[:64]), reference)

            def ours():
                for _ in range(rounds):
                    encoder.encode_images(pixels)

            _, seconds = timed(ours)
            rate = rounds * len(pixels) / seconds
            rows.append({"check": "model only", "model": name, "backend": f"{backend} fp16", "img_s": rate,
                         "vs_peer": rate / peer_rate, "cosine": agreement, "cold_s": cold + first,
                         "note": getattr(encoder, "image_forward", "")})
            encoder = None
            torch.cuda.empty_cache()
        except Exception as error:
            rows.append({"check": "model only", "model": name, "backend": f"{backend} fp16",
                         "result": f"failed: {type(error).__name__}: {error}"[:300], "ok": False})
            traceback.print_exc()


def jpeg_to_embedding(name: str, config, paths: list[str], folder: Path, rows: list[dict], cache: Path) -> None:
    import open_clip
    import torch
    from PIL import Image

    class Files(torch.utils.data.Dataset):
        def __init__(self, files, preprocess):
            self.files, self.preprocess = files, preprocess

        def __len__(self):
            return len(self.files)

        def __getitem__(self, index):
            return self.preprocess(Image.open(self.files[index]).convert("RGB"))

    peer = open_clip_model(config)
    preprocess = open_clip.transform.image_transform(224, is_train=False)
    loader = torch.utils.data.DataLoader(Files(paths, preprocess), batch_size=JPEG_BATCH,
                                         num_workers=len(os.sched_getaffinity(0)), pin_memory=True)

    def peer_pass():
        out = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for batch in loader:
                features = peer.encode_image(batch.cuda(non_blocking=True))
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    reference, seconds = timed(peer_pass)
    peer_rate = len(paths) / seconds
    rows.append({"check": "JPEG → embedding", "model": name, "backend": "open_clip fp16, DataLoader",
                 "img_s": peer_rate})
    peer = loader = None
    torch.cuda.empty_cache()
    jpeg_dir = Path(paths[0]).parent
    for backend in gpu_backends():
        out = folder / f"cold-{name}-{backend}"
        command = [sys.executable, "-m", "clipengine", "encode", str(jpeg_dir), "--out", str(out), "--model", name,
                   "--weights", str(config.weights), "--backend", backend, "--device", "cuda", "--quiet",
                   "--batch-size", str(JPEG_BATCH)]
        environment = {**os.environ, "CLIPENGINE_CACHE_DIR": str(cache)}
        try:
            done, cold = timed(subprocess.run, command, capture_output=True, text=True, timeout=240, env=environment)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "exit code")
            ours = np.load(out / "embeddings.npy")
            decode = json.loads((out / "model.json").read_text()).get("decode", "")
            warm = warm_encode(config, backend, jpeg_dir, folder / f"warm-{name}-{backend}")
            rows.append({"check": "JPEG → embedding", "model": name, "backend": f"{backend} fp16 (clipengine encode)",
                         "img_s": len(paths) / warm, "vs_peer": (len(paths) / warm) / peer_rate,
                         "cold_s": cold, "cold_img_s": len(paths) / cold,
                         "cosine": cosine_min(ours, reference), "note": f"decode {decode}"})
        except Exception as error:
            rows.append({"check": "JPEG → embedding", "model": name, "backend": f"{backend} fp16",
                         "result": f"failed: {type(error).__name__}: {error}"[:300], "ok": False})
            traceback.print_exc()
        finally:
            shutil.rmtree(out, ignore_errors=True)


def warm_encode(config, backend: str, jpeg_dir: Path, out: Path) -> float:
    """Seconds of ``encode_items`` over the JPEGs with the encoder already made and warmed up."""
    from clipengine.config import EncodeConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.inputs import items_from_input
    from clipengine.encode.stage import encode_items

    settings = EncodeConfig(model=config, backend=backend, device="cuda", precision="fp16", batch_size=JPEG_BATCH,
                            progress=False)
    encoder = create_encoder(settings)
    items = items_from_input(str(jpeg_dir))
    encode_items(items.head(JPEG_BATCH * 2), out.with_name(out.name + "-warmup"), settings, encoder=encoder)
    _, seconds = timed(encode_items, items, out, settings, encoder=encoder)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + "-warmup"), ignore_errors=True)
    return seconds


# ---- 3. labelling, 4. search ------------------------------------------------------------------
def stored_embeddings(rows_count: int, dim: int, seed: int = 0) -> np.ndarray:
    """(rows_count, dim) float32 L2-normalized rows in host memory, made on the GPU."""
    import cupy

    out = np.empty((rows_count, dim), np.float32)
    generator = cupy.random.default_rng(seed)
    step = 1 << 20
    for start in range(0, rows_count, step):
        block = generator.standard_normal((min(step, rows_count - start), dim), dtype=cupy.float32)
        block /= cupy.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block.get()
    return out


def labelling(embeddings: np.ndarray, rows: list[dict]) -> None:
    import torch

    from clipengine.kernels.similarity import label_segments

    rng = np.random.default_rng(1)
    n_attributes, n_classes = 40, 2
    classes = rng.standard_normal((n_attributes * n_classes, embeddings.shape[1])).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    prompt_offsets = np.arange(len(classes) + 1)
    class_offsets = np.arange(0, len(classes) + 1, n_classes)
    label_segments(embeddings[:100_000], classes, prompt_offsets, class_offsets, 100.0, device="cuda")  # compile
    (labels, _, _), seconds = timed(label_segments, embeddings, classes, prompt_offsets, class_offsets, 100.0,
                                    device="cuda")
    device_classes = torch.from_numpy(classes).cuda()

    def reference():
        out = np.empty((len(embeddings), n_attributes), np.int32)
        step = 1 << 20
        with torch.inference_mode():
            for start in range(0, len(embeddings), step):
                block = torch.from_numpy(embeddings[start:start + step]).cuda(non_blocking=True)
                logits = (block @ device_classes.T * 100.0).view(len(block), n_attributes, n_classes)
                out[start:start + len(block)] = logits.softmax(-1).argmax(-1).int().cpu().numpy()
        return out

    reference()  # warm-up
    want, peer_seconds = timed(reference)
    rows.append({"check": "labelling 10M × 512, 40 binary attributes", "backend": "torch GEMM + softmax",
                 "rows_s": len(embeddings) / peer_seconds})
    rows.append({"check": "labelling 10M × 512, 40 binary attributes", "backend": "clipengine label_segments",
                 "rows_s": len(embeddings) / seconds, "vs_peer": peer_seconds / seconds,
                 "agree": float((labels == want).mean())})


def search(embeddings: np.ndarray, rows: list[dict]) -> None:
    import torch

    from clipengine.kernels import topk

    rng = np.random.default_rng(2)
    queries = embeddings[rng.integers(0, len(embeddings), SEARCH_QUERIES)] + np.float32(0.05) * rng.standard_normal(
        (SEARCH_QUERIES, embeddings.shape[1])).astype(np.float32)
    (index, _), cold = timed(topk.topk_search, embeddings, queries, SEARCH_K, device="cuda")
    _, warm = timed(topk.topk_search, embeddings, queries, SEARCH_K, device="cuda")
    resident = topk.resident_rows(embeddings, "cuda")
    rows_t = torch.from_dlpack(resident.rows)
    queries_t = torch.from_numpy(queries).cuda()

    def peer():
        with torch.inference_mode():
            result = torch.topk(queries_t @ rows_t.T, SEARCH_K, dim=1).indices.cpu().numpy()
        return result

    peer()
    want, peer_seconds = timed(peer)
    rows.append({"check": f"search 10M × 512, {SEARCH_QUERIES} queries, k {SEARCH_K}", "backend": "torch GEMM + topk",
                 "seconds": peer_seconds})
    rows.append({"check": f"search 10M × 512, {SEARCH_QUERIES} queries, k {SEARCH_K}",
                 "backend": "clipengine topk_search (exact, resident)", "seconds": warm, "cold_s": cold,
                 "vs_peer": peer_seconds / warm, "agree": float((index == want).mean())})
    topk.release_resident_rows()


# ---- report -------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    info = report["machine"]
    print(f"\n{info.get('gpu', 'no GPU')} ({info.get('capability', '')}, {info.get('gpu_memory_gib', '?')} GiB, "
          f"driver {info.get('driver', '?')}) · {info['cpu']} (AMX: {info['amx']}), {info['cores']} cores · "
          f"torch {info['torch']} · cupy {info['cupy']} · tensorrt {info['tensorrt']} · {info['date']}")
    header = f"{'check':<44} {'model':<9} {'backend':<40} {'rate':>14} {'× peer':>7} {'agree':>9} {'cold':>8}"
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        if "img_s" in row:
            rate = f"{row['img_s']:,.0f} img/s"
        elif "rows_s" in row:
            rate = f"{row['rows_s'] / 1e6:,.1f} M rows/s"
        elif "seconds" in row:
            rate = f"{row['seconds'] * 1e3:,.1f} ms"
        else:
            rate = row.get("result", "")
        agree = row.get("cosine", row.get("agree"))
        ratio = f"{row['vs_peer']:.2f}" if "vs_peer" in row else ""
        agreement = f"{agree:.5f}" if agree is not None else ""
        cold = f"{row['cold_s']:.1f} s" if "cold_s" in row else ""
        print(f"{row['check'][:44]:<44} {row.get('model', ''):<9} {row.get('backend', '')[:40]:<40} {rate:>14} "
              f"{ratio:>7} {agreement:>9} {cold:>8}")
        if row.get("note"):
            print(f"{'':<55}{row['note'][:120]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B/32 only, 1M rows, fewer JPEGs (a smoke run).")
    parser.add_argument("--skip-tests", action="store_true", help="Do not run pytest -m gpu first.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report as JSON here.")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("clipengine bench gpu: no CUDA GPU is visible", file=sys.stderr)
        return 2
    report = {"machine": machine(), "rows": []}
    rows = report["rows"]
    started = time.perf_counter()
    if not args.skip_tests:
        run_gpu_tests(rows)
    models = MODELS[:1] if args.quick else MODELS
    jpegs = 1024 if args.quick else JPEG_COUNT
    with tempfile.TemporaryDirectory(prefix="clipengine-bench-gpu-") as work:
        work = Path(work)
        cache = work / "cache"
        from clipengine.bench.encode import decoded_set, make_jpegs

        paths = make_jpegs(work / "jpegs", jpegs)
        pixels = decoded_set(paths, MODEL_BATCH)
        for name in models:
            config = make_model(name, work)
            for stage in (model_only, jpeg_to_embedding):
                try:
                    if stage is model_only:
                        stage(name, config, pixels, rows, cache)
                    else:
                        stage(name, config, paths, work, rows, cache)
                except Exception as error:
                    rows.append({"check": stage.__name__, "model": name, "result": f"failed: {error}"[:300], "ok": False})
                    traceback.print_exc()
                torch.cuda.empty_cache()
            print(f"[{time.perf_counter() - started:.0f} s] {name} done", file=sys.stderr, flush=True)
        try:
            embeddings = stored_embeddings(1_000_000 if args.quick else LABEL_ROWS, EMBED_DIM)
            labelling(embeddings, rows)
            search(embeddings, rows)
        except Exception as error:
            rows.append({"check": "labelling / search", "result": f"failed: {error}"[:300], "ok": False})
            traceback.print_exc()
    report["seconds"] = time.perf_counter() - started
    print_table(report)
    print(f"\nwhole check: {report['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    sys.exit(main())
