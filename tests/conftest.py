"""Shared test set-up: offline, a private cache directory per test session, CUDA hidden from CPU tests.

Fixtures owned by one area live in that area's own conftest (tests/<area>/conftest.py)
or in tests/fixtures_*.py modules imported from here.
"""

from __future__ import annotations

import os

# Tests never download. CUDA stays visible to the process: tests marked gpu use it; every other test runs
# with CUDA_VISIBLE_DEVICES="" (the _hide_cuda_from_cpu_tests fixture), so that "auto" picks the CPU there
# and subprocesses they start see no GPU.
os.environ["CLIPENGINE_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from clipengine.bindings.hub_kernels import unshadow_hub_kernels  # noqa: E402

unshadow_hub_kernels()  # the tests import open_clip and transformers themselves

from tests.fixtures_models import sample_photos, tiny_clip, vit_b32_checkpoint  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Every cache (ONNX exports, class embeddings, datasets) goes to a fresh folder."""
    path = tmp_path_factory.mktemp("clipengine-cache")
    previous = os.environ.get("CLIPENGINE_CACHE_DIR")
    os.environ["CLIPENGINE_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CLIPENGINE_CACHE_DIR", None)
    else:
        os.environ["CLIPENGINE_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _hide_cuda_from_cpu_tests(request, monkeypatch):
    """Tests not marked gpu see no GPU (the engine reads CUDA_VISIBLE_DEVICES before it probes CUDA)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _cuda_available() -> bool:
    return False if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") else _probe_cuda()


def _probe_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # the marker, not item.keywords: keywords also hold the names of the folders above the test
    if not any(item.get_closest_marker("gpu") for item in items) or _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
