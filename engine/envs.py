"""The only reader of environment variables.

Every variable clipengine understands is defined here once, with its default;
the rest of the package calls these functions instead of reading ``os.environ``.

| variable | meaning | default |
| --- | --- | --- |
| CLIPENGINE_CACHE_DIR | ONNX exports, TensorRT plans, class embeddings, datasets | ``~/.cache/clipengine`` |
| CLIPENGINE_OFFLINE | never try to download weights (also HF_HUB_OFFLINE=1) | off |
| CLIPENGINE_NUM_THREADS | CPU threads for torch / ONNX Runtime / Numba | all cores |
| CLIPENGINE_FASHION_MNIST_DIR | Fashion-MNIST idx files | ``/usr/share/datasets/fashion-mnist`` |
| CUDA_VISIBLE_DEVICES | read only to decide whether to probe CUDA at all | unset |
| HF_ENDPOINT | the Hugging Face hub open_clip downloads weights from (probed before a download) | ``https://huggingface.co`` |
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Root of every on-disk cache; safe to delete."""
    configured = os.environ.get("CLIPENGINE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clipengine"


def offline() -> bool:
    """True when no download may be attempted."""
    for name in ("CLIPENGINE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    return False


def hf_endpoint() -> str:
    """Base URL of the Hugging Face hub (huggingface_hub reads the same variable)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def num_threads() -> int:
    """CPU threads for the compute runtimes (at least 1)."""
    configured = os.environ.get("CLIPENGINE_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def cuda_hidden() -> bool:
    """True when CUDA_VISIBLE_DEVICES hides every GPU (then CUDA is never probed)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in {"", "-1"}


def fashion_mnist_dir() -> Path:
    """Where Debian's ``dataset-fashion-mnist`` installs the idx files."""
    return Path(os.environ.get("CLIPENGINE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
