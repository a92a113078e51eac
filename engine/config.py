"""One configuration dataclass per stage, with defaults as named constants.

CLI options fill these; stage functions take them. Nothing here reads the
environment (that is ``clipengine.envs``). Each stage owns its dataclass; add
fields next to their stage with a named default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# ---- model selection (shared by encode, annotate, search, run) -------------------------------
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_BACKEND = "auto"
DEFAULT_DEVICE = "auto"


@dataclass(frozen=True)
class ModelConfig:
    """Which model: an open_clip architecture with a pretrained tag, a local checkpoint,
    a local Hugging Face CLIP directory, or ``conse`` (the offline ConSE encoder)."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    weights: Path | None = None


# ---- encode ---------------------------------------------------------------------------------
DEFAULT_BATCH_SIZE = 64
DEFAULT_BOX_MARGIN = 0.1
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
DEFAULT_PREFETCH_BATCHES = 4
DEFAULT_SHARD_SIZE = 4096


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of the encode stage.

    ``precision`` None means: the fastest precision for the device that keeps cosine
    ≥ 0.9999 to fp32 (chosen by the backend); ``workers`` None means one decode worker per core.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    backend: str = DEFAULT_BACKEND
    device: str = DEFAULT_DEVICE
    precision: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    box_margin: float = DEFAULT_BOX_MARGIN
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES
    shard_size: int = DEFAULT_SHARD_SIZE
    progress: bool = True


# ---- annotate -------------------------------------------------------------------------------
DEFAULT_STRATEGY = "mean"
DEFAULT_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class AnnotateConfig:
    """Settings of the annotate stage: which schema, how prompts are aggregated."""

    schema: str = "celeba"
    strategy: str = DEFAULT_STRATEGY
    device: str = DEFAULT_DEVICE
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool = True


# ---- slices ---------------------------------------------------------------------------------
DEFAULT_K = 10
DEFAULT_ALPHA = 0.95
DEFAULT_MAX_LEVEL = 3
DEFAULT_BINS = 10
DEFAULT_MAX_Q = 0.05


@dataclass(frozen=True)
class SliceConfig:
    """Settings of SliceLine. ``min_sup`` is a row count (int ≥ 1) or a fraction of rows (0 < f < 1);
    None means ⌈n/100⌉."""

    k: int = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    min_sup: float | int | None = None
    max_level: int = DEFAULT_MAX_LEVEL
    bins: int = DEFAULT_BINS
    compat: str | None = None
    max_q: float | None = DEFAULT_MAX_Q


# ---- run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """The whole job: a dataset through encode → annotate → errors → slices → report."""

    dataset: str = "fashion-mnist"
    root: Path | None = None
    out: Path | None = None
    schema: str | None = None
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    executor: str = "local"
    quiet: bool = False
    log_json: bool = False
