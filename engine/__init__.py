"""clipengine: semantic testing of vision models.

Encode images with CLIP, annotate them zero-shot from prompt-ensemble schemas,
and find the weak slices of a model under test with SliceLine.

Heavy dependencies (torch, open_clip, CuPy, TensorRT, Numba) are imported on
first use, never at ``import clipengine``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "find_slices": "clipengine.slices.find:find_slices",
    "compare_runs": "clipengine.compare.stage:compare_runs",
}


def __getattr__(name: str):
    target = _LAZY_ATTRIBUTES.get(name)
    if target is None:
        raise AttributeError(f"module 'clipengine' has no attribute {name!r}")
    import importlib

    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)
