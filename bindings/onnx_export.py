"""Export the image tower to ONNX once, cached on disk (build is separate from run).

The graph takes what the image pipeline produces and returns what the engine stores:

    images: (N, S, S, 3) uint8 RGB  →  embeddings: (N, D) float32, rows L2-normalized

with the uint8 → float cast, NHWC → NCHW and the model's mean/std inside the graph, so a runtime
ships 4× fewer bytes to the device. A class-token-pooled open_clip ViT is exported with its last
block on the class token only (:mod:`clipengine.bindings.class_token`: same output, fewer FLOPs).
Batch is dynamic; opset ``OPSET`` (≥ 17: LayerNormalization is one node, which TensorRT can keep
in fp32). The file lives under
``<cache_dir>/onnx/<name>-<key>.onnx`` where ``key`` hashes the model key (architecture + weights
content), the export settings and the torch version; deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.files import atomic_path

OPSET = 18
EXPORT_FORMAT = 2  # bump when the graph's inputs/outputs or wrapper change (2: class-token last block)
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def image_graph_key(towers: ModelTowers, *, opset: int = OPSET) -> str:
    """Hex key of the image graph of ``towers`` under the current export settings."""
    import torch

    blob = json.dumps(
        {
            "model": towers.key,
            "image_size": towers.image_size,
            "mean": list(towers.mean),
            "std": list(towers.std),
            "opset": opset,
            "format": EXPORT_FORMAT,
            "input": "uint8 NHWC",
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def image_onnx_path(towers: ModelTowers, cache_dir: str | os.PathLike, *, opset: int = OPSET) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (towers.name or "model"))[:60]
    return Path(cache_dir) / "onnx" / f"{safe}-{image_graph_key(towers, opset=opset)}.onnx"


def image_graph_forward(towers: ModelTowers) -> str:
    """What the exported graph runs as the image tower: "ONNX graph, last block on the class token",
    else "ONNX graph of the module (why the last block runs on every token)"."""
    from clipengine.bindings.class_token import unprunable_reason

    reason = unprunable_reason(towers.image_tower)
    return "ONNX graph, last block on the class token" if reason is None else f"ONNX graph of the module ({reason})"


def _image_graph_module(towers: ModelTowers):
    import torch

    from clipengine.bindings.class_token import ClassTokenVisionTower, unprunable_reason

    class ImageGraph(torch.nn.Module):
        """(N, S, S, 3) uint8 → (N, D) float32 L2-normalized."""

        def __init__(self, visual, mean, std):
            super().__init__()
            self.visual = visual
            std_t = torch.tensor(std, dtype=torch.float32)
            mean_t = torch.tensor(mean, dtype=torch.float32)
            self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
            self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1))

        def forward(self, images):
            pixels = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
            features = self.visual(pixels)
            return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    visual = towers.image_tower
    if unprunable_reason(visual) is None:
        visual = ClassTokenVisionTower(visual)
    return ImageGraph(visual, towers.mean, towers.std).eval()


def export_image_onnx(towers: ModelTowers, destination: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Export the image graph of ``towers`` to ``destination`` (one self-contained .onnx file,
    written atomically). Uses torch's ``torch.export``-based exporter, falling back to the
    TorchScript exporter where a model does not trace with it."""
    import onnx
    import torch

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    module = _image_graph_module(towers)
    example = torch.zeros((2, towers.image_size, towers.image_size, 3), dtype=torch.uint8)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as work:
        raw = Path(work) / "graph.onnx"
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(None):
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(
                    module, (example,), str(raw), opset_version=opset, dynamo=True, external_data=True,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                    verbose=False,
                )
            except Exception:
                torch.onnx.export(
                    module, (example,), str(raw), opset_version=max(opset, 17), dynamo=False,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
        graph = onnx.load(str(raw), load_external_data=True)  # one file: weights inlined (< 2 GB)
        onnx.checker.check_model(graph)
        with atomic_path(destination) as staged:
            onnx.save_model(graph, str(staged), save_as_external_data=False)
    return destination


def ensure_image_onnx(towers: ModelTowers, cache_dir: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """The cached image graph of ``towers``, exported now if absent (one process exports; others wait)."""
    from clipengine.bindings.files import ensure_built

    path = image_onnx_path(towers, cache_dir, opset=opset)
    return ensure_built(path, lambda destination: export_image_onnx(towers, destination, opset=opset))
