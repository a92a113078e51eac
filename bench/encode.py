"""Encode: what a user pays for ``clipengine encode`` (whole process, cold and warm) against open_clip plain and tuned.

    flock /tmp/clipengine-bench.lock python bench/encode.py [--images 1024] [--rounds 2] [--json OUT.json]

Data: ``--images`` JPEG files made from scikit-image's sample photos at varied sizes (500×400 .. 1000×800) and
a random-init ``--model`` (ViT-B-32; ViT-B-32-quickgelu is the architecture of OpenAI's weights) saved as
safetensors (the same weights everywhere; nothing is downloaded).

1. **Whole processes** (the headline), each timed from spawn to exit with its own peak RSS, interleaved in
   ``--rounds`` rounds (the order alternates between rounds; medians reported):
   - ``clipengine encode JPEGS --out OUT --model MODEL --weights W`` (its defaults: ``auto`` backend and
     precision, decode threads), **cold**: an empty cache folder (``auto`` measures this CPU, any ONNX
     export happens), and **warm**: the same command again with that cache, into a fresh output folder;
   - open_clip **plain**: its own loop (``create_model_and_transforms``, PIL + its preprocess per image,
     batches, ``encode_image`` under ``no_grad``, ``np.save``);
   - open_clip **tuned**: its preprocess in a ``DataLoader`` with one worker per core, threads set, inference
     mode, under bf16 autocast (``tuned-bf16``) and in fp32 (``tuned-fp32``: on CPUs where bf16 is slower),
     with glibc malloc's thresholds set as clipengine sets its own (:mod:`clipengine.bindings.allocator`);
   every ratio is taken against the best peer configuration, with the plain loop's beside it.
2. **Model only** (kernel-only column), one process, batches interleaved: clipengine's encoder as ``auto``
   chose it (``encode_images`` on decoded uint8 batches) against open_clip ``encode_image`` in fp32 and under
   bf16 autocast on the same pixels.
3. **The machine's limits**: the GEMM rate at the ViT's shapes (QKV, attention output, MLP up and down, M =
   batch × tokens) in fp32 and bf16 (oneDNN's linear, and ``torch.mm``) and int8 (oneDNN's int8 linear,
   uint8 × int8 → fp32, as the torch int8 form calls it), each as one call on every core and, where the
   encoder splits a batch into streams, as that many calls side by side on their shares of the cores and rows
   (the peak is the best of all of them), the model's FLOPs per image
   (counted from the architecture, the class-token-only last block included where it runs) and so its
   achieved fraction of the peak of the precision it runs in (for int8: of the time every matmul would take
   at the peak of its own precision, int8 for QKV and MLP, fp32 for the rest); clipengine's decode pipeline alone
   (img/s); and the end-to-end rate against min(model rate, decode rate) (decode beside the model) and
   1 / (1/model + 1/decode) (both sharing every core).
   The peak is a hot-cache rate: repeated calls find their operands in cache. Beside it, the same GEMMs with
   every cache evicted before each call (the cold rate), and where one batch of clipengine's forward goes
   under torch's profiler (linear layers, attention, norms, the rest): the linear layers' rate inside the
   forward against both, and the ceiling, the fraction of the peak the model would reach were its linear
   layers at the peak and everything else as profiled.
4. **Agreement**: lowest cosine between clipengine's rows and open_clip plain's rows of the same files; and
   the int8 paths (torch's int8 form, ONNX Runtime int8) of the whole model on the bench photos against
   open_clip fp32 (the bar ``auto`` holds every precision to is cosine ≥ 0.9999; it checks it on its probe
   images, this on the photos).

Every figure is printed under the machine's line (CPU model, AMX or not, cores, load, date). Targets (issue
20, 1,024 JPEGs): ≥ 3× open_clip plain and ≥ 1.5× open_clip tuned on AMX CPUs; ≥ 1.5× plain without AMX;
model-only ≥ 70 % of the measured GEMM peak of the precision chosen. Each is printed as met or not met.
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

DEFAULT_IMAGES = 1024
DEFAULT_BATCH = 64
DEFAULT_ROUNDS = 2
DEFAULT_MODEL_BATCHES = 4
PEERS = ("plain", "tuned-bf16", "tuned-fp32")
MODEL = "ViT-B-32"  # the default architecture; --model picks another (ViT-B-32-quickgelu: OpenAI's)
GEMM_SECONDS = 0.4
GEMM_PRECISIONS = ("fp32", "bf16", "int8")


# ---- data (also used by bench/gpu.py) ------------------------------------------------------------
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


def make_weights(folder: Path, model: str) -> Path:
    """Random-init open_clip ``model`` saved as safetensors in ``folder`` (seed 0: the same weights every run)."""
    import open_clip
    import torch

    from clipengine.encode.models import build_open_clip_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(build_open_clip_model(open_clip.get_model_config(model)), folder / f"{model}-random.safetensors")


def decoded_set(paths: list[str], count: int) -> np.ndarray:
    """(count, 224, 224, 3) uint8: the model-only inputs (exact decode, as open_clip's preprocess)."""
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    spec = ImageSpec(image_size=224, fast_jpeg=False, fast_resize=False)
    return np.stack([load_image(paths[i % len(paths)], None, spec) for i in range(count)])


# ---- FLOPs and GEMM rates ----------------------------------------------------------------------
def vit_shape(architecture: dict) -> dict:
    """Image size, patch, width, layers, MLP width, output width of an open_clip ViT architecture dict."""
    vision = architecture["vision_cfg"]
    width = int(vision["width"])
    return {"image_size": int(vision["image_size"]), "patch": int(vision["patch_size"]), "width": width,
            "layers": int(vision["layers"]), "mlp_width": int(width * vision.get("mlp_ratio", 4.0)),
            "output_dim": int(architecture["embed_dim"])}


def vit_gflops_parts(shape: dict, *, class_token_last_block: bool) -> dict[str, float]:
    """GFLOP (2 per multiply-add) of one image through the ViT, by part: ``patch`` embedding, ``qkv`` (keys
    and values of every token, queries of the tokens that leave each block), ``attention`` (scores and
    weighted values), ``attention out`` projection, ``mlp`` (up and down), output ``projection``. With
    ``class_token_last_block`` only the class token's query, attention, output projection and MLP run in
    the last block."""
    grid = (shape["image_size"] // shape["patch"]) ** 2
    tokens = grid + 1
    width, mlp = shape["width"], shape["mlp_width"]
    last_queries = 1 if class_token_last_block else tokens
    queries = (shape["layers"] - 1) * tokens + last_queries  # rows leaving the blocks, summed over blocks
    multiply_adds = {
        "patch": grid * 3 * shape["patch"] ** 2 * width,
        "qkv": shape["layers"] * tokens * width * 2 * width + queries * width * width,
        "attention": 2 * queries * tokens * width,
        "attention out": queries * width * width,
        "mlp": 2 * queries * width * mlp,
        "projection": width * shape["output_dim"],
    }
    return {part: 2 * count / 1e9 for part, count in multiply_adds.items()}


def vit_gflops(shape: dict, *, class_token_last_block: bool) -> float:
    """Floating-point operations of one image through the ViT: every part of :func:`vit_gflops_parts`."""
    return sum(vit_gflops_parts(shape, class_token_last_block=class_token_last_block).values())


def vit_int8_gflops(shape: dict, *, class_token_last_block: bool) -> float:
    """The part of :func:`vit_gflops` that the torch int8 form runs as int8 matmuls: every block's QKV and
    MLP up and down (the attention's scores, output projection, patch embedding and projection stay fp32)."""
    parts = vit_gflops_parts(shape, class_token_last_block=class_token_last_block)
    return parts["qkv"] + parts["mlp"]


def vit_attention_gflops(shape: dict, *, class_token_last_block: bool) -> float:
    """The part of :func:`vit_gflops` inside attention itself (scores and weighted values, every block): the
    matmuls that run in ``scaled_dot_product_attention``, not as linear layers."""
    return vit_gflops_parts(shape, class_token_last_block=class_token_last_block)["attention"]


def gemm_shapes(shape: dict, batch: int) -> dict[str, tuple[int, int, int]]:
    """name → (M, K, N) of the ViT's GEMMs on a batch."""
    rows = batch * ((shape["image_size"] // shape["patch"]) ** 2 + 1)
    width, mlp = shape["width"], shape["mlp_width"]
    return {"qkv": (rows, width, 3 * width), "attention out": (rows, width, width),
            "mlp up": (rows, width, mlp), "mlp down": (rows, mlp, width)}


def gemm_gflops(m: int, k: int, n: int, dtype_name: str, seconds: float = GEMM_SECONDS, *,
                evict=None, streams: int = 1) -> dict[str, float]:
    """GFLOP/s of (M, K) × (K, N) in ``dtype_name`` through oneDNN's linear (what the fused CPU forward calls)
    and ``torch.mm``; medians of repeated calls after a warm-up. ``evict``, when given, runs before every
    call (untimed): :func:`cache_evicter`'s pass, so each call starts with its operands out of the caches.
    ``streams`` > 1: as the encoder's streams run (:mod:`clipengine.bindings.cpu_streams`), that many threads
    at once, each with its share of torch's threads on its share of the M rows; the rate is their sum, and
    each name says "in N streams"."""
    if streams > 1:
        return _gemm_gflops_in_streams(m, k, n, dtype_name, seconds, streams)
    import torch

    with torch.inference_mode():
        return {name: 2.0 * m * k * n / _median_seconds(call, seconds, evict) / 1e9
                for name, call in _gemm_calls(m, k, n, dtype_name).items()}


def _gemm_calls(m: int, k: int, n: int, dtype_name: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    if dtype_name == "int8":
        return _int8_gemm_calls(m, k, n, generator)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    weight_t = weight.t().contiguous()
    calls = {"torch.mm": lambda: torch.mm(x, weight_t)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        calls["oneDNN linear"] = lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return calls


def _median_seconds(call, seconds: float, evict=None) -> float:
    """Median seconds of ``call()`` over at least 3 calls and ``seconds``, after two untimed calls;
    ``evict()`` (untimed) before each timed call."""
    call()
    call()
    times = []
    started = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - started < seconds:
        if evict is not None:
            evict()
        tick = time.perf_counter()
        call()
        times.append(time.perf_counter() - tick)
    return float(np.median(times))


def _gemm_gflops_in_streams(m: int, k: int, n: int, dtype_name: str, seconds: float, streams: int) -> dict:
    import threading

    import torch

    from clipengine.bindings.cpu_streams import split_evenly

    total_threads = torch.get_num_threads()
    shares = split_evenly(m, total_threads, streams)
    start = threading.Barrier(streams)
    rates: list[dict] = [{} for _ in shares]

    def stream(index: int) -> None:
        share_rows, share_threads = shares[index]
        torch.set_num_threads(share_threads)
        with torch.inference_mode():
            for name, call in _gemm_calls(share_rows, k, n, dtype_name).items():
                start.wait()  # every stream times the same call at the same time
                rates[index][name] = 2.0 * share_rows * k * n / _median_seconds(call, seconds) / 1e9

    workers = [threading.Thread(target=stream, args=(index,)) for index in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    torch.set_num_threads(total_threads)
    return {f"{name} in {streams} streams": sum(rate[name] for rate in rates) for name in rates[0]}


def cache_evicter():
    """A function that writes a buffer twice the last-level cache's size (64 MiB .. 2 GiB), so the next GEMM
    reads its weights and activations from memory: the other side of the isolated peak, whose repeated calls
    find their operands in cache. Inside a forward a matmul's operands are somewhere between the two."""
    import torch

    from clipengine.bench._machine import last_level_cache_bytes

    size = min(max(2 * last_level_cache_bytes(), 64 * 2**20), 2 * 2**30)
    buffer = torch.empty(size // 4, dtype=torch.float32)
    return lambda: buffer.fill_(1.0)


# ---- where a forward's time goes ------------------------------------------------------------------
MATMUL_OPS = ("mkldnn::_linear_pointwise", "onednn::qlinear_pointwise", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "aten::linear", "aten::matmul")
OP_CATEGORIES = (("matmuls", lambda name: name.split(".")[0] in MATMUL_OPS),
                 ("attention", lambda name: "scaled_dot_product" in name or name.split(".")[0] == "aten::_softmax"),
                 ("norms", lambda name: "layer_norm" in name))


def split_op_seconds(op_seconds: dict[str, float], wall_seconds: float) -> dict[str, float]:
    """Seconds per part of a forward from the profiler's self time per op: ``matmuls`` (linear layers, fused
    post-ops included), ``attention``, ``norms``, ``other torch ops``, and ``outside torch ops``: the wall time
    no op accounts for (Python, the Numba passes, waiting)."""
    parts = {name: 0.0 for name, _ in OP_CATEGORIES} | {"other torch ops": 0.0}
    for op, seconds in op_seconds.items():
        part = next((name for name, matches in OP_CATEGORIES if matches(op)), "other torch ops")
        parts[part] += seconds
    parts["outside torch ops"] = max(wall_seconds - sum(parts.values()), 0.0)
    return parts


def forward_time_split(call, repeats: int = 2) -> dict:
    """Run ``call()`` ``repeats`` times under torch's profiler: ``{"wall_s": per call, "parts_s": per call}``
    (:func:`split_op_seconds`). Self times are the calling thread's, so an op's parallel region counts once.
    Where the encoder splits a batch into streams the calling thread runs the first of them beside the others,
    so the parts are that stream's: with S streams on the machine's S shares, its seconds per image of its
    own are S times the machine's per image of the batch, and its seconds divided by the whole batch's images
    are the machine's per image, as without streams."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        wall = (time.perf_counter() - started) / repeats
    op_seconds = {event.key: event.self_cpu_time_total / 1e6 / repeats for event in profiler.key_averages()}
    return {"wall_s": wall, "parts_s": split_op_seconds(op_seconds, wall)}


def _int8_gemm_calls(m: int, k: int, n: int, generator) -> dict:
    """The int8 GEMM the torch int8 form calls: oneDNN's ``qlinear_pointwise`` on uint8 activations and
    prepacked int8 weights, int32 accumulation, float32 out (the activations' quantization not included)."""
    import torch

    from clipengine.bindings.torch_vit_cpu import int8_linear_available

    if not int8_linear_available():
        return {}
    codes = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=generator)
    weight = torch.ops.onednn.qlinear_prepack(
        torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator), None)
    scales, zero_points = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int64)
    return {"oneDNN int8 linear": lambda: torch.ops.onednn.qlinear_pointwise(
        codes, 0.02, 128, weight, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], "")}


# ---- one configuration per process --------------------------------------------------------------
def run_peer(args) -> dict:
    """open_clip as a user runs it: ``plain`` (its loop) or ``tuned-bf16`` / ``tuned-fp32`` (DataLoader with one
    worker per core, threads set, inference mode, bf16 autocast or fp32). Writes ``embeddings.npy``."""
    import open_clip
    import torch
    from PIL import Image

    paths = Path(args.listing).read_text().split()
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=str(args.weights))
    model.eval()
    out = []
    if args.peer == "plain":
        with torch.no_grad():
            for start in range(0, len(paths), args.batch_size):
                batch = torch.stack([preprocess(Image.open(p)) for p in paths[start:start + args.batch_size]])
                out.append(model.encode_image(batch, normalize=True).numpy())
    else:
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cores)

        class Files(torch.utils.data.Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, index):
                return preprocess(Image.open(paths[index]))

        loader = torch.utils.data.DataLoader(Files(), batch_size=args.batch_size, num_workers=cores)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.peer == "tuned-bf16"):
            for batch in loader:
                out.append(model.encode_image(batch, normalize=True).float().numpy())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings.npy", np.concatenate(out))
    return {"images": len(paths)}


def run_limits(args) -> dict:
    """Model-only rates (clipengine's auto encoder; open_clip fp32 and bf16 autocast; batches interleaved), the
    GEMM rates at the ViT's shapes, the model's FLOPs, and clipengine's decode pipeline alone."""
    import open_clip
    import torch

    from clipengine.bindings.cpu_streams import stream_plan
    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.pipeline import iter_batches

    cores = len(os.sched_getaffinity(0))
    paths = Path(args.listing).read_text().split()
    encoder = create_encoder(EncodeConfig(model=ModelConfig(model=args.model, weights=Path(args.weights)),
                                          batch_size=args.batch_size, progress=False))
    record = encoder.model_record
    peer = open_clip.create_model(args.model, pretrained=str(args.weights)).eval()
    pixels = decoded_set(paths, args.batch_size * (args.model_batches + 1))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def normalized(batch: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    def peer_call(batch: np.ndarray, bf16: bool) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model_rows(peer.encode_image(normalized(batch), normalize=True))

    def model_rows(tensor):
        return tensor.float().numpy()

    torch.set_num_threads(cores)
    calls = {"clipengine": encoder.encode_images, "open_clip fp32": lambda b: peer_call(b, False),
             "open_clip bf16 autocast": lambda b: peer_call(b, True)}
    seconds = {name: [] for name in calls}
    rows = {name: [] for name in calls}
    for index in range(args.model_batches + 1):
        batch = pixels[index * args.batch_size:(index + 1) * args.batch_size]
        for name, call in (calls.items() if index % 2 == 0 else reversed(list(calls.items()))):
            started = time.perf_counter()
            result = call(batch)
            if index:  # the first batch warms every path up
                seconds[name].append(time.perf_counter() - started)
                rows[name].append(result)
    model_only = {name: args.batch_size / float(np.median(values)) for name, values in seconds.items()}
    reference = np.concatenate(rows["open_clip fp32"])
    cosines = {name: float(np.min(np.sum(np.concatenate(r) * reference, axis=1))) for name, r in rows.items()}

    shape = vit_shape(open_clip.get_model_config(args.model))
    forward = str(record.get("image_forward", ""))
    class_token = "class token" in forward or forward.startswith("fused CPU forward") or "last block on the class token" in forward
    shapes = gemm_shapes(shape, args.batch_size)
    # the machine's limit is the best of one call on every core and the encoder's streams side by side
    streams = len(stream_plan(args.batch_size, cores)) if record.get("cpu_streams", 1) > 1 else 1
    gemm = {precision: {name: {**gemm_gflops(*mkn, precision),
                               **(gemm_gflops(*mkn, precision, streams=streams) if streams > 1 else {})}
                        for name, mkn in shapes.items()}
            for precision in GEMM_PRECISIONS}
    evict = cache_evicter()
    gemm_cold = {precision: {name: gemm_gflops(*mkn, precision, evict=evict) for name, mkn in shapes.items()}
                 for precision in peak_precisions(record.get("precision"))}
    del evict  # its buffer (twice the last-level cache) is not held through the profile and the int8 check
    split = None
    if record.get("backend") == "torch":  # ONNX Runtime's ops run outside torch's profiler
        split = forward_time_split(lambda: encoder.encode_images(pixels[:args.batch_size]))

    int8 = {}
    if args.int8_check:
        from clipengine import bindings, envs
        from clipengine.encode.models import load_model, resolve_model

        towers = load_model(resolve_model(ModelConfig(model=args.model, weights=Path(args.weights))))
        batch = pixels[args.batch_size:2 * args.batch_size]
        for backend in ("torch", "onnxruntime"):
            if bindings.check_backend(backend, "cpu", "int8") is not None:
                continue
            quantized = bindings.load_backend(backend)(towers, device="cpu", precision="int8", num_threads=cores,
                                                       cache_dir=envs.cache_dir())
            quantized.encode_images(batch)
            started = time.perf_counter()
            int8_rows = quantized.encode_images(batch)
            int8[backend] = {"img_s": len(batch) / (time.perf_counter() - started),
                             "cosine_to_fp32": float(np.min(np.sum(int8_rows * rows["open_clip fp32"][0], axis=1)))}

    spec = ImageSpec(224)
    started = time.perf_counter()
    decoded = sum(len(batch.indices) for batch in iter_batches(paths, None, spec, batch_size=args.batch_size))
    decode_rate = decoded / (time.perf_counter() - started)
    return {
        "record": {key: record.get(key) for key in ("backend", "precision", "image_forward", "cpu_streams",
                                                    "auto_choice")},
        "streams_per_batch": streams,
        "model_only_img_s": model_only, "model_only_cosine_to_fp32": cosines,
        "gflops_per_image": vit_gflops(shape, class_token_last_block=class_token),
        "int8_gflops_per_image": vit_int8_gflops(shape, class_token_last_block=class_token),
        "gflops_per_image_full": vit_gflops(shape, class_token_last_block=False),
        "attention_gflops_per_image": vit_attention_gflops(shape, class_token_last_block=class_token),
        "class_token_last_block": class_token, "gemm_gflops": gemm, "gemm_batch": args.batch_size,
        "gemm_gflops_cold": gemm_cold, "forward_split": split,
        "decode_img_s": decode_rate, "threads": cores, "int8_whole_model": int8,
    }


# ---- orchestration --------------------------------------------------------------------------------
def spawn(command: list[str], env: dict, log: Path) -> dict:
    """Run ``command`` to its end: wall seconds from spawn to exit, peak RSS (its own rusage), exit code."""
    started = time.perf_counter()
    with open(log, "w") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    result = {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "exit": code}
    if code:
        lines = log.read_text().strip().splitlines()
        result["error"] = lines[-1] if lines else f"exit {code}"
    return result


def role_command(role: str, args, **extra) -> list[str]:
    command = [sys.executable, __file__, "--role", role, "--model", args.model, "--weights", str(args.weights),
               "--listing", str(args.listing),
               "--batch-size", str(args.batch_size), "--model-batches", str(args.model_batches)]
    if not args.int8_check:
        command.append("--no-int8-check")
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def orchestrate(args) -> dict:
    import polars as pl

    from clipengine.bench._machine import machine_record
    from clipengine.bindings import allocator
    from clipengine.encode.inputs import list_image_files

    report: dict = {"machine": machine_record(), "images": args.images, "batch_size": args.batch_size,
                    "model": f"{args.model} (random init, safetensors)", "rounds": []}
    with tempfile.TemporaryDirectory(prefix="clipengine-bench-encode-") as tmp:
        work = Path(tmp)
        make_jpegs(work / "jpegs", args.images)
        paths = list_image_files(work / "jpegs")  # the order `clipengine encode` lists them in
        args.weights = make_weights(work, args.model)
        args.listing = work / "files.txt"
        args.listing.write_text("\n".join(paths))
        base_env = {**os.environ, "CLIPENGINE_OFFLINE": "1"}
        base_env.pop("CLIPENGINE_NUM_THREADS", None)  # the defaults a user gets
        peers = [p for p in args.peers.split(",") if p]
        reference_rows = None
        for number in range(args.rounds):
            cache = work / f"cache-{number}"
            record: dict = {}
            order = ["cold", "warm", *peers]
            if number % 2:  # alternate which side goes first
                order = [*peers, "cold", "warm"]
            for name in order:
                out = work / f"out-{number}-{name}"
                log = work / f"{number}-{name}.stderr"
                if name in ("cold", "warm"):
                    command = [sys.executable, "-m", "clipengine", "encode", str(work / "jpegs"), "--out", str(out),
                               "--model", args.model, "--weights", str(args.weights), "--batch-size", str(args.batch_size),
                               "--quiet"]
                    result = spawn(command, {**base_env, "CLIPENGINE_CACHE_DIR": str(cache)}, log)
                    if "error" not in result:
                        rows = np.load(out / "embeddings.npy")
                        order_paths = pl.read_parquet(out / "items.parquet")["path"].to_list()
                        if order_paths != paths:
                            result["error"] = "clipengine listed the files in another order"
                        result["rows"] = rows
                        model_json = json.loads((out / "model.json").read_text())
                        result["choice"] = f"{model_json.get('backend')} {model_json.get('precision')}"
                        result["auto_choice"] = model_json.get("auto_choice", {}).get("reason")
                else:  # the tuned peers get the malloc settings clipengine sets for itself
                    env = {**base_env, **allocator.environment()} if name.startswith("tuned") else base_env
                    result = spawn(role_command("peer", args, peer=name, out_dir=out), env, log)
                    if "error" not in result:
                        result["rows"] = np.load(out / "embeddings.npy")
                shutil.rmtree(out, ignore_errors=True)
                record[name] = result
            if "plain" in record and "rows" in record["plain"]:
                reference_rows = record["plain"]["rows"]
            for result in record.values():
                rows = result.pop("rows", None)
                if rows is not None and reference_rows is not None and rows.shape == reference_rows.shape:
                    result["cosine_to_plain"] = cosine_min(rows, reference_rows)
            report["rounds"].append(record)
            print(f"[round {number + 1}/{args.rounds}] " + ", ".join(
                f"{name} {r['seconds']:.1f} s" if "error" not in r else f"{name} failed" for name, r in record.items()),
                file=sys.stderr, flush=True)
        limits = spawn(role_command("limits", args, result=work / "limits.json"),
                       {**base_env, "CLIPENGINE_CACHE_DIR": str(work / "cache-0")}, work / "limits.stderr")
        report["limits"] = json.loads((work / "limits.json").read_text()) if "error" not in limits else limits
    summarize(report)
    return report


def summarize(report: dict) -> None:
    """Medians over the rounds, ratios against the best peer and the plain loop, the limits and the targets."""
    images = report["images"]
    names = [name for name in report["rounds"][0]]
    whole = {}
    for name in names:
        runs = [r[name] for r in report["rounds"] if "error" not in r[name]]
        if not runs:
            whole[name] = {"error": report["rounds"][0][name].get("error")}
            continue
        seconds = float(np.median([r["seconds"] for r in runs]))
        whole[name] = {"seconds": seconds, "img_s": images / seconds, "runs": [r["seconds"] for r in runs],
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        for key in ("cosine_to_plain", "choice", "auto_choice"):
            values = [r[key] for r in runs if key in r]
            if values:
                whole[name][key] = min(values) if key == "cosine_to_plain" else values[-1]
    report["whole"] = whole
    peers = [name for name in whole if name not in ("cold", "warm") and "error" not in whole[name]]
    if not peers:
        return
    best = min(peers, key=lambda name: whole[name]["seconds"])
    report["best_peer"] = best
    for side in ("cold", "warm"):
        if "error" in whole.get(side, {"error": 1}):
            continue
        whole[side]["vs_best_peer"] = whole[best]["seconds"] / whole[side]["seconds"]
        if "plain" in whole and "error" not in whole["plain"]:
            whole[side]["vs_plain"] = whole["plain"]["seconds"] / whole[side]["seconds"]
    limits = report.get("limits", {})
    if "model_only_img_s" not in limits:
        return
    chosen = (limits["record"].get("precision") or "fp32")
    peaks, cold_peaks = (best_rates(limits.get(key, {})) for key in ("gemm_gflops", "gemm_gflops_cold"))
    model_rate = limits["model_only_img_s"]["clipengine"]
    total = limits["gflops_per_image"]
    int8 = chosen == "int8" and "int8" in peaks
    peak_precision = "int8 (QKV, MLP) + fp32 (the rest)" if int8 else ("bf16" if chosen == "bf16" else "fp32")

    def seconds_at(rates: dict, gflops: float) -> float:
        """Seconds an image's ``gflops`` of matmuls would take, each at ``rates`` of the precision it runs in."""
        if int8:
            int8_part = limits["int8_gflops_per_image"]
            return int8_part / rates["int8"] + (gflops - int8_part) / rates["fp32"]
        return gflops / rates[peak_precision]

    seconds_at_peak = seconds_at(peaks, total)
    decode = limits["decode_img_s"]
    report["bounds"] = {
        "chosen_precision": chosen, "peak_precision": peak_precision, "gemm_peak_gflops": peaks,
        "gemm_cold_gflops": cold_peaks,
        "model_achieved_gflops": model_rate * total, "model_fraction_of_peak": seconds_at_peak * model_rate,
        "min_model_decode_img_s": min(model_rate, decode),
        "shared_cores_img_s": 1.0 / (1.0 / model_rate + 1.0 / decode),
    }
    split = limits.get("forward_split")
    if split and split["parts_s"]["matmuls"] > 0:
        batch = limits["gemm_batch"]
        linear_gflops = total - limits.get("attention_gflops_per_image", 0.0)
        matmul_seconds = split["parts_s"]["matmuls"] / batch
        rest_seconds = split["wall_s"] / batch - matmul_seconds
        linear_at_peak = seconds_at(peaks, linear_gflops)
        cold_measured = set(cold_peaks) >= ({"int8", "fp32"} if int8 else {peak_precision})
        report["bounds"]["forward_split"] = {
            "matmul_fraction_of_peak": linear_at_peak / matmul_seconds,
            "matmul_fraction_of_cold": seconds_at(cold_peaks, linear_gflops) / matmul_seconds if cold_measured else None,
            # the model's fraction of the peak were its linear layers at the peak and the rest as profiled
            "ceiling_fraction": seconds_at_peak / (linear_at_peak + rest_seconds),
        }
    if "error" not in whole.get("warm", {"error": 1}):
        warm = whole["warm"]["img_s"]
        report["bounds"]["warm_fraction_of_min"] = warm / report["bounds"]["min_model_decode_img_s"]
        report["bounds"]["warm_fraction_of_shared"] = warm / report["bounds"]["shared_cores_img_s"]
    report["targets"] = targets(report)


def peak_precisions(chosen: str | None) -> tuple[str, ...]:
    """The GEMM precisions a forward in ``chosen`` runs its matmuls in (the int8 form keeps some in fp32)."""
    if chosen == "int8":
        return ("int8", "fp32")
    return ("bf16",) if chosen == "bf16" else ("fp32",)


def best_rates(gemm: dict) -> dict[str, float]:
    """precision → the best rate over the shapes and calls measured in it (``{precision: {shape: {call: rate}}}``)."""
    return {precision: max(max(rates.values()) for rates in per_shape.values() if rates)
            for precision, per_shape in gemm.items() if any(per_shape.values())}


def targets(report: dict) -> list[dict]:
    whole, bounds = report["whole"], report["bounds"]
    amx = report["machine"].get("amx_in_use", report["machine"]["amx"])  # AMX present and oneDNN using it
    warm = whole.get("warm", {})
    rows = []
    if "vs_plain" in warm:
        rows.append({"target": f"≥ {3 if amx else 1.5}× open_clip plain (warm, whole process)",
                     "value": warm["vs_plain"], "met": warm["vs_plain"] >= (3 if amx else 1.5)})
    if amx and "vs_best_peer" in warm:
        rows.append({"target": f"≥ 1.5× open_clip at its best ({report['best_peer']}, whole process)",
                     "value": warm["vs_best_peer"], "met": warm["vs_best_peer"] >= 1.5})
    rows.append({"target": f"model only ≥ 70 % of the measured {bounds['peak_precision']} GEMM peak",
                 "value": bounds["model_fraction_of_peak"], "met": bounds["model_fraction_of_peak"] >= 0.7})
    return rows


def print_report(report: dict) -> None:
    from clipengine.bench._machine import machine_line

    print(f"# bench/encode: {report['model']}, {report['images']} JPEGs (500×400..1000×800), batch "
          f"{report['batch_size']}, medians of {len(report['rounds'])} rounds")
    print(f"# {machine_line(report['machine'])}")
    whole = report.get("whole", {})
    if "warm" in whole and "choice" in whole["warm"]:
        print(f"# clipengine's auto choice here: {whole['warm']['choice']} — {whole['warm'].get('auto_choice')}")
    print("\n| whole process (spawn → exit) | seconds | img/s | × best peer | × plain | peak RSS MB | cosine to plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = {"cold": "clipengine encode, cold (empty cache)", "warm": "clipengine encode, warm",
              "plain": "open_clip plain loop", "tuned-bf16": "open_clip tuned, bf16 autocast",
              "tuned-fp32": "open_clip tuned, fp32"}
    for name, row in whole.items():
        if "error" in row:
            print(f"| {labels.get(name, name)} | failed: {row['error']} | | | | | |")
            continue
        best = f"{row['vs_best_peer']:.2f}×" if "vs_best_peer" in row else ("best" if name == report.get("best_peer") else "")
        plain = f"{row['vs_plain']:.2f}×" if "vs_plain" in row else ""
        cosine = f"{row['cosine_to_plain']:.5f}" if name != "plain" and "cosine_to_plain" in row else ""
        print(f"| {labels.get(name, name)} | {row['seconds']:.1f} | {row['img_s']:.1f} | {best} | {plain} | "
              f"{row['peak_rss_mb']:.0f} | {cosine} |")
    limits = report.get("limits", {})
    if "model_only_img_s" in limits:
        print(f"\n| model only (decoded batches of {report['batch_size']}, interleaved) | img/s | × open_clip fp32 | "
              "cosine to open_clip fp32 |")
        print("| --- | --- | --- | --- |")
        reference = limits["model_only_img_s"]["open_clip fp32"]
        record = limits["record"]
        for name, rate in limits["model_only_img_s"].items():
            streams = limits.get("streams_per_batch", 1)
            in_streams = f", a batch in {streams} streams" if streams > 1 else ""
            label = (f"clipengine ({record['backend']} {record['precision']}, {record['image_forward']}{in_streams})"
                     if name == "clipengine" else name)
            print(f"| {label} | {rate:.1f} | {rate / reference:.2f}× | {limits['model_only_cosine_to_fp32'][name]:.5f} |")
        bounds = report["bounds"]
        measured = [p for p in GEMM_PRECISIONS if p in limits["gemm_gflops"]]
        print(f"\n| GEMM at the ViT's shapes (M = {limits['gemm_batch']} × tokens), G(FL)OP/s | {' | '.join(measured)} |")
        print("| --- |" + " --- |" * len(measured))
        for shape in limits["gemm_gflops"]["fp32"]:
            cells = [" / ".join(f"{name} {rate:.0f}" for name, rate in limits["gemm_gflops"][p][shape].items())
                     for p in measured]
            print(f"| {shape} | {' | '.join(cells)} |")
        peaks, cold = bounds["gemm_peak_gflops"], bounds.get("gemm_cold_gflops", {})
        print(f"| peak (best of the above) | {' | '.join(f'{peaks[p]:.0f}' if p in peaks else '' for p in measured)} |")
        if cold:
            print("| cold operands (caches evicted before each call), best | "
                  f"{' | '.join(f'{cold[p]:.0f}' if p in cold else '' for p in measured)} |")
        print(f"\nmodel: {limits['gflops_per_image']:.2f} GFLOP per image as run (class-token-only last block: "
              f"{'yes' if limits['class_token_last_block'] else 'no'}; full forward {limits['gflops_per_image_full']:.2f}); "
              f"clipengine model only {bounds['model_achieved_gflops']:.0f} GFLOP/s = "
              f"{100 * bounds['model_fraction_of_peak']:.0f} % of the {bounds['peak_precision']} GEMM peak"
              + (f" (int8 matmuls: {limits['int8_gflops_per_image']:.2f} GOP per image)"
                 if bounds["chosen_precision"] == "int8" else ""))
        split, split_bounds = limits.get("forward_split"), bounds.get("forward_split")
        if split and split_bounds:
            parts = ", ".join(f"{name} {1e3 * seconds:.0f}" for name, seconds in split["parts_s"].items())
            cold_part = (f", {100 * split_bounds['matmul_fraction_of_cold']:.0f} % of the cold rate"
                         if split_bounds["matmul_fraction_of_cold"] else "")
            print(f"where one batch of {limits['gemm_batch']} goes (torch profiler): {1e3 * split['wall_s']:.0f} ms = "
                  f"{parts} ms; the linear layers run at {100 * split_bounds['matmul_fraction_of_peak']:.0f} % of the "
                  f"{bounds['peak_precision']} peak{cold_part}. With every linear layer at the peak and the rest "
                  f"as profiled, the model would reach {100 * split_bounds['ceiling_fraction']:.0f} % of the peak")
        print(f"decode alone (clipengine's pipeline, {limits['threads']} threads): {limits['decode_img_s']:.1f} img/s; "
              f"model alone {limits['model_only_img_s']['clipengine']:.1f} img/s")
        line = (f"end-to-end limit: min(model, decode) {bounds['min_model_decode_img_s']:.1f} img/s; both sharing "
                f"the cores 1/(1/model + 1/decode) {bounds['shared_cores_img_s']:.1f} img/s")
        if "warm_fraction_of_shared" in bounds:
            line += (f"; clipengine warm whole process reaches {100 * bounds['warm_fraction_of_min']:.0f} % and "
                     f"{100 * bounds['warm_fraction_of_shared']:.0f} % of them")
        print(line)
        for backend, int8 in limits.get("int8_whole_model", {}).items():
            print(f"{backend} int8 (whole model) on the bench photos: cosine to open_clip fp32 "
                  f"{int8['cosine_to_fp32']:.5f} (auto's bar: ≥ 0.9999), model only {int8['img_s']:.1f} img/s")
    for row in report.get("targets", []):
        print(f"target {row['target']}: {row['value']:.2f} — {'met' if row['met'] else 'NOT met'}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="JPEG files [1024]")
    parser.add_argument("--model", default=MODEL,
                        help=f"open_clip ViT architecture, random init [{MODEL}]; ViT-B-32-quickgelu is OpenAI's CLIP")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="batch size everywhere [64]")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds of whole processes [2]")
    parser.add_argument("--model-batches", type=int, default=DEFAULT_MODEL_BATCHES,
                        help="timed model-only batches per configuration [4]")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"open_clip configurations [{','.join(PEERS)}]")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--no-int8-check", dest="int8_check", action="store_false",
                        help="skip the int8 paths of the whole model (torch int8, and ONNX Runtime int8: "
                             "an ONNX export, about a minute)")
    # worker mode (internal)
    parser.add_argument("--role", choices=["peer", "limits"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=PEERS, default=None, help=argparse.SUPPRESS)
    for name in ("--result", "--out-dir", "--weights", "--listing"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.role == "peer":
        run_peer(args)
        return 0
    if args.role == "limits":
        Path(args.result).write_text(json.dumps(run_limits(args)))
        return 0
    from clipengine.bench._install import compile_clipengine

    compile_clipengine()  # as pip compiles an installed copy: no process below compiles clipengine's sources
    report = orchestrate(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    failed = [name for name, row in report.get("whole", {}).items() if "error" in row]
    return 1 if failed or "error" in report.get("limits", {}) else 0


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    sys.exit(main())
