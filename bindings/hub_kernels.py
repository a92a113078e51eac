"""Keep this repository's ``kernels/`` folder from hiding PyPI's ``kernels`` package.

transformers (≥ 5) imports the PyPI package ``kernels`` (Hugging Face's hub kernels) whenever it is
installed. In a checkout, ``clipengine.kernels`` lives in a top-level folder named ``kernels/``; when
the checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -m clipengine`` run from
the root), ``import kernels`` finds that folder instead, and importing transformers (open_clip's
Hugging Face towers, sentence-transformers for ConSE) fails. :func:`unshadow_hub_kernels` imports
the real package first, so later ``import kernels`` statements get it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def _own_kernels_dir() -> Path | None:
    spec = importlib.util.find_spec("clipengine.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _is_own(module_file: str | None, own: Path) -> bool:
    return module_file is not None and Path(module_file).resolve().parent == own


def unshadow_hub_kernels() -> None:
    """Import PyPI's ``kernels`` (if installed) under the name ``kernels``, never this repository's folder."""
    own = _own_kernels_dir()
    if own is None:
        return
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if not _is_own(getattr(loaded, "__file__", None), own):
            return
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("kernels")
    if spec is None or not _is_own(spec.origin, own):
        return
    root = own.parent
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)  # not installed: transformers then does not ask for it
    finally:
        sys.path[:] = saved
