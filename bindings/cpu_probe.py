"""A short measurement of this CPU's encode paths, from which ``auto`` chooses (the engine decides; this
module only measures).

Whether bf16 beats fp32 on a CPU is not written in its flags: with AMX tiles it is several times faster,
with only AVX512-BF16 it can be slower than fp32. So each candidate path runs its real encoder class on
*probe towers*: the model's image tower shape (image size, patch, width, heads, MLP width, output width)
with few random-init blocks (:data:`PROBE_DEPTHS`). That keeps what makes a path fast or slow on a CPU
(the GEMMs at the model's shapes, attention, LayerNorm, the runtime's own overheads) at a fraction of the
model's cost. Timing two depths separates the per-block time from the once-per-image part (patch
embedding, pooling, projection, the runtime's call), and the model's rate is predicted at its own depth:
a shallow probe alone would weigh the once-per-image part several times too heavily.

Candidates (``PATHS``): ``torch-fp32``, ``torch-bf16`` (only on a CPU with bf16 instructions),
``torch-int8`` (the fused forward's int8 matmuls), ``onnxruntime-fp32`` and ``onnxruntime-int8`` (the probe's
ONNX graph is exported once and cached with the other graphs). The calls are interleaved over :data:`PROBE_ROUNDS` rounds and each time is the median, so a
busy spell of the machine hits every candidate alike; each candidate's rows are compared with
``torch-fp32``'s on the same probe images (lowest cosine, on the deeper probe).

:func:`cached_measurements` keeps the result in ``<cache_dir>/cpu-probe/<key>.json``, the key hashing the
CPU model name, its flags, the core count the encoders use, the probe's shape and the versions of torch,
ONNX Runtime and this file's format: the measurement runs once per CPU kind and software, not per encode.
A machine busy with other work (load average above its cores) distorts the rates (OpenMP teams wait on
descheduled threads), so such a measurement is marked ``busy`` and measured again by the first call that
finds the machine quiet.

This module never imports the engine.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROBE_FORMAT = 6  # bump when what is measured changes (old cache entries are then ignored)
PROBE_DEPTHS = (1, 3)  # blocks of the two probe towers
PROBE_BATCH = 16
PROBE_ROUNDS = 3
PATHS = ("torch-fp32", "torch-bf16", "torch-int8", "onnxruntime-fp32", "onnxruntime-int8")
REFERENCE_PATH = "torch-fp32"


@dataclass(frozen=True)
class ProbeShape:
    """The shape of a ViT image tower (what the probe towers copy; ``layers``: the model's own depth, at which
    its rate is predicted; ``activation``: the MLP's, "gelu", "gelu_tanh" or "quick_gelu", as the fused CPU
    forward names it: each costs its own post-op inside the MLP's matmul)."""

    image_size: int = 224
    patch: int = 32
    width: int = 768
    heads: int = 12
    mlp_width: int = 3072
    output_dim: int = 512
    layers: int = 12
    activation: str = "gelu"

    @classmethod
    def of_towers(cls, towers: Any) -> "ProbeShape | None":
        """The shape of ``towers``' image tower (a ``ModelTowers``; from its ``vision`` tensors when it
        has them, without building the module); None where :meth:`of_tower` gives None."""
        vision = towers.vision
        if vision is not None:
            return cls(image_size=int(towers.image_size), patch=vision.patch, width=vision.width, heads=vision.heads,
                       mlp_width=vision.mlp_width, output_dim=int(towers.embed_dim), layers=vision.layers,
                       activation=vision.activation)
        return cls.of_tower(towers.image_tower, towers.image_size, towers.embed_dim)

    @classmethod
    def of_tower(cls, visual: Any, image_size: int, output_dim: int) -> "ProbeShape | None":
        """The shape of an open_clip ``VisionTransformer`` or of a tower holding a transformers ``CLIPModel``
        (as ``tower.clip``); None for anything else."""
        from clipengine.bindings.torch_vit_cpu import hf_vision, mlp_activation

        hf = hf_vision(visual)
        if hf is not None:
            vision, _ = hf
            config = vision.config
            return cls(image_size=int(image_size), patch=int(config.patch_size), width=int(config.hidden_size),
                       heads=int(config.num_attention_heads), mlp_width=int(config.intermediate_size),
                       output_dim=int(output_dim), layers=int(config.num_hidden_layers),
                       activation=mlp_activation(vision.encoder.layers[0].mlp.activation_fn) or "gelu")
        if type(visual).__name__ != "VisionTransformer" or not hasattr(visual, "transformer"):
            return None
        try:
            block = visual.transformer.resblocks[0]
            return cls(image_size=int(image_size), patch=int(visual.conv1.kernel_size[0]),
                       width=int(visual.conv1.out_channels), heads=int(block.attn.num_heads),
                       mlp_width=int(block.mlp.c_fc.out_features), output_dim=int(output_dim),
                       layers=len(visual.transformer.resblocks), activation=mlp_activation(block.mlp.gelu) or "gelu")
        except (AttributeError, IndexError, TypeError):
            return None


def probe_towers(shape: ProbeShape, layers: int):
    """A ``ModelTowers`` whose image tower is an open_clip ViT of ``shape`` with ``layers`` blocks and fixed
    random weights (no text tower: the probe encodes images only)."""
    import torch
    from open_clip.model import VisionTransformer
    from open_clip.transformer import QuickGELU

    from clipengine.bindings.base import ModelTowers

    activations = {"gelu": torch.nn.GELU, "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
                   "quick_gelu": QuickGELU}

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same probe weights every time, without touching the caller's RNG afterwards
    try:
        tower = VisionTransformer(image_size=shape.image_size, patch_size=shape.patch, width=shape.width,
                                  layers=layers, heads=shape.heads, mlp_ratio=shape.mlp_width / shape.width,
                                  output_dim=shape.output_dim,
                                  act_layer=activations[shape.activation]).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(generator_state)
    tower_shape = {**asdict(shape), "layers": layers}
    key = "cpu-probe-" + hashlib.sha256(json.dumps(tower_shape, sort_keys=True).encode()).hexdigest()[:16]
    return ModelTowers(image_tower=tower, text_tower=None, tokenize=None, image_size=shape.image_size,
                       embed_dim=shape.output_dim, mean=(0.48145466, 0.4578275, 0.40821073),
                       std=(0.26862954, 0.26130258, 0.27577711), key=key, name="cpu-probe")


def probe_images(shape: ProbeShape, count: int = PROBE_BATCH) -> np.ndarray:
    """(count, S, S, 3) uint8: smooth random fields with grain, photo-like in their statistics (not noise)."""
    import torch

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (count, 3, 8, 8)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(shape.image_size, shape.image_size), mode="bicubic",
                                             align_corners=False)
    grain = torch.from_numpy(rng.normal(0, 6, smooth.shape).astype(np.float32))
    return (smooth + grain).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def cpu_identity(num_threads: int) -> dict[str, Any]:
    """What a measurement holds for: CPU model, flags (a hash of all, and the ones that matter by name),
    threads, and the runtimes' versions."""
    import torch

    from clipengine.bindings import cpu_flags, onednn_isa_limit

    flags = cpu_flags()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "cpu": cpu_model_name(),
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "onednn_max_cpu_isa": onednn_isa_limit(),  # a ceiling set for oneDNN changes every rate
        "threads": int(num_threads),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "format": PROBE_FORMAT,
    }


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(shape: ProbeShape, num_threads: int) -> str:
    blob = json.dumps({"cpu": cpu_identity(num_threads), "shape": asdict(shape), "depths": PROBE_DEPTHS,
                       "batch": PROBE_BATCH}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def measure_paths(shape: ProbeShape, *, num_threads: int, cache_dir, rounds: int = PROBE_ROUNDS) -> dict[str, dict]:
    """Each of :data:`PATHS` on the probe towers of ``shape``: ``{"img_s": the rate predicted at the model's
    depth, "probe_img_s": {depth: measured rate}, "cosine": lowest cosine of its rows to torch-fp32's on the
    deeper probe}``, or ``{"skipped": why}`` where the path cannot run here."""
    from clipengine.bindings import backend_installed, cpu_supports_bf16, load_backend

    towers = {depth: probe_towers(shape, depth) for depth in PROBE_DEPTHS}
    images = probe_images(shape)
    results: dict[str, dict] = {}
    encoders: dict[tuple[str, int], Any] = {}
    for name in PATHS:
        backend, precision = name.split("-")
        if precision == "bf16" and not cpu_supports_bf16():
            results[name] = {"skipped": "no bf16 instructions on this CPU (neither AMX nor AVX512-BF16)"}
            continue
        if not backend_installed(backend):
            results[name] = {"skipped": f"{backend} is not installed"}
            continue
        try:
            started = time.perf_counter()
            for depth, probe in towers.items():
                options = {"onnx_path": probe_graph(probe, cache_dir, precision)} if backend == "onnxruntime" else {}
                encoder = load_backend(backend)(probe, device="cpu", precision=precision, num_threads=num_threads,
                                                cache_dir=cache_dir, **options)
                encoder.encode_images(images)  # warm-up: oneDNN primitives, ONNX Runtime's allocations
                encoders[name, depth] = encoder
            results[name] = {"setup_s": round(time.perf_counter() - started, 2)}
        except Exception as error:  # a path that fails here is not a candidate
            results[name] = {"skipped": f"failed: {type(error).__name__}: {error}"[:200]}
            for depth in PROBE_DEPTHS:
                encoders.pop((name, depth), None)
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in encoders}
    for _ in range(max(1, rounds)):
        for key, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode_images(images)
            seconds[key].append(time.perf_counter() - started)
    shallow, deep = PROBE_DEPTHS[0], PROBE_DEPTHS[-1]
    reference = encoders[REFERENCE_PATH, deep].encode_images(images) if (REFERENCE_PATH, deep) in encoders else None
    for name in {name for name, _ in encoders}:
        times = {depth: float(np.median(seconds[name, depth])) for depth in PROBE_DEPTHS}
        results[name]["probe_img_s"] = {str(depth): len(images) / times[depth] for depth in PROBE_DEPTHS}
        results[name]["img_s"] = len(images) / predicted_seconds(times[shallow], times[deep], shallow, deep,
                                                                 shape.layers)
        if reference is not None:
            rows = encoders[name, deep].encode_images(images)
            results[name]["cosine"] = float(np.min(np.sum(rows * reference, axis=1)))
    return results


def predicted_seconds(shallow_s: float, deep_s: float, shallow: int, deep: int, layers: int) -> float:
    """Seconds of a batch at ``layers`` blocks from its seconds at ``shallow`` and ``deep`` blocks: the time per
    block is the slope, the rest is paid once per batch. Where noise made the deeper probe no slower, all of
    its time is counted as blocks (the pessimistic reading)."""
    per_block = (deep_s - shallow_s) / (deep - shallow)
    if per_block <= 0.0:
        return deep_s * layers / deep
    return shallow_s + (layers - shallow) * per_block


def probe_graph(towers, cache_dir, precision: str) -> Path:
    """The probe tower's ONNX graph in ``precision`` (fp32, or int8 made from it), cached under
    ``<cache_dir>/cpu-probe``. Exported with torch's TorchScript exporter: the same ONNX ops at the same shapes
    as the engine's export of the model, in seconds instead of the ``torch.export`` exporter's tens."""
    import torch

    from clipengine.bindings.files import ensure_built
    from clipengine.bindings.onnx_export import OPSET, export_image_onnx
    from clipengine.bindings.onnxruntime import ensure_int8_of

    fp32 = Path(cache_dir) / "cpu-probe" / f"{towers.key}-torch{torch.__version__}-opset{OPSET}.onnx"
    ensure_built(fp32, lambda destination: export_image_onnx(towers, destination, exporter="torchscript"))
    return ensure_int8_of(fp32) if precision == "int8" else fp32


def cached_measurements(shape: ProbeShape, *, num_threads: int, cache_dir) -> dict[str, Any]:
    """The probe's record for this CPU (measured now if the cache has none): ``measured`` (see
    :func:`measure_paths`), ``cpu`` (:func:`cpu_identity`), ``probe`` (shape, blocks, batch, rounds),
    ``date``, ``seconds`` (what the measurement took), ``file``, and ``cached`` (False when measured by this
    call). One process measures while concurrent ones wait for its file."""
    from clipengine.bindings.files import ensure_built, write_json

    path = Path(cache_dir) / "cpu-probe" / f"{probe_key(shape, num_threads)}.json"
    measured_here = []

    def build(destination: Path) -> None:
        load = machine_load()
        started = time.perf_counter()
        measured = measure_paths(shape, num_threads=num_threads, cache_dir=cache_dir)
        write_json(destination, {
            "measured": measured,
            "cpu": cpu_identity(num_threads),
            "probe": {**asdict(shape), "depths": list(PROBE_DEPTHS), "batch": PROBE_BATCH, "rounds": PROBE_ROUNDS},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.perf_counter() - started, 2),
            "load_average": round(load, 2),
            "busy": machine_busy(load),
        })
        measured_here.append(True)

    ensure_built(path, build)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged entry: measure again
        record = None
    if record is None or (record.get("busy") and not measured_here and not machine_busy(machine_load())):
        os.unlink(path)
        ensure_built(path, build)
        record = json.loads(path.read_text(encoding="utf-8"))
    return {**record, "file": str(path), "cached": not measured_here}


def machine_load() -> float:
    """The one-minute load average (0 where the system has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def machine_busy(load: float) -> bool:
    """Whether other work keeps more threads runnable than the machine has cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return load > cores


def model_cosine(towers, path: str, *, num_threads: int, cache_dir) -> float:
    """Lowest cosine between the rows of ``towers``' whole image tower run by ``path`` ("backend-precision")
    and by torch fp32, on the probe images: the check that a precision chosen on the probe towers keeps its
    agreement at the model's full depth and with its own weights. Cached per model, path and software in
    ``<cache_dir>/cpu-probe``."""
    import torch

    from clipengine.bindings import load_backend
    from clipengine.bindings.files import write_json

    backend, precision = path.rsplit("-", 1)
    key = hashlib.sha256(json.dumps([towers.key, path, torch.__version__, cpu_identity(num_threads)["onnxruntime"],
                                     PROBE_FORMAT]).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / "cpu-probe" / f"cosine-{key}.json"
    try:
        return float(json.loads(cached.read_text(encoding="utf-8"))["cosine"])
    except (OSError, ValueError, KeyError):
        pass
    images = probe_images(ProbeShape(image_size=int(towers.image_size)), count=8)
    reference = load_backend("torch")(towers, device="cpu", precision="fp32", num_threads=num_threads)
    candidate = load_backend(backend)(towers, device="cpu", precision=precision, num_threads=num_threads,
                                      cache_dir=cache_dir)
    cosine = float(np.min(np.sum(candidate.encode_images(images) * reference.encode_images(images), axis=1)))
    write_json(cached, {"model": towers.key, "path": path, "cosine": cosine})
    return cosine
