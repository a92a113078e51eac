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
DEFAULT_SHARD_SECONDS = 60.0  # a shard is also written after this long, so a kill loses at most ~a minute
DEFAULT_OUTPUT_DTYPE = "float32"
# where JPEGs are decoded: "cpu" (PIL in threads), "device" (torchvision on the encoder's device: nvJPEG on
# CUDA; other formats on the CPU), "auto" (the device when it is a GPU and --exact-decode is off)
DECODE_CHOICES = ("auto", "cpu", "device")
DEFAULT_DECODE = "auto"


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of the encode stage.

    ``precision`` None means: the fastest precision for the device that keeps cosine
    ≥ 0.9999 to fp32 (chosen by the backend); ``workers`` None means one decode worker per core.
    Finished work is written every ``shard_size`` items or ``shard_seconds`` (whichever first);
    ``output_dtype`` (float32 | float16) is the dtype of ``embeddings.npy``; ``exact_decode`` turns off
    reduced-DCT JPEG decoding and the vectorized resize (then pixels are bit-identical to open_clip's
    preprocess, slower). ``decode``: where JPEGs are decoded (one of ``DECODE_CHOICES``).
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
    shard_seconds: float = DEFAULT_SHARD_SECONDS
    output_dtype: str = DEFAULT_OUTPUT_DTYPE
    exact_decode: bool = False
    decode: str = DEFAULT_DECODE
    progress: bool = True


# ---- annotate -------------------------------------------------------------------------------
DEFAULT_ADAPT = "auto"  # with a labels file: adapt each attribute where cross-validation says it helps
DEFAULT_MIN_PRECISION = 0.5  # an attribute is unreliable when a class's 95 % precision interval starts below this
DEFAULT_SAMPLE_SIZE = 200  # clipengine sample --n


@dataclass(frozen=True)
class AnnotateConfig:
    """Settings of the annotate stage: which schema, how prompts are aggregated.

    ``strategy`` None keeps the schema's own (per attribute); otherwise ``"max"`` sets every
    attribute, ``"hair_color=max,eyeglasses=topm"`` sets some, and both mix (``"mean,bald=max"``).
    ``model`` None means the model recorded in the embeddings directory's ``model.json``;
    given, it must be that same model (annotate refuses to mix models). ``chunk_rows`` None sizes
    the kernel's chunks to a fixed scratch budget (``clipengine.kernels.similarity.CHUNK_BYTES``, and
    ``BLOCK_BYTES`` per thread for the CPU's GEMM blocks).
    ``thresholds``: a ``thresholds.json`` from ``clipengine eval --calibrate``, applied to binary attributes.
    ``labels``: a labels file (``clipengine sample``'s ``labels.csv`` filled in, or Label Studio's JSON
    export): labelled items keep their label, and ``adapt`` (auto, none, prototype, gda, tip) says
    how the attributes it labels adapt to it (:mod:`clipengine.annotate.adapt`).
    """

    schema: str = "celeba"
    strategy: str | None = None
    device: str = DEFAULT_DEVICE
    chunk_rows: int | None = None
    model: ModelConfig | None = None
    thresholds: Path | None = None
    progress: bool = True
    labels: Path | None = None
    adapt: str = DEFAULT_ADAPT


# ---- slices ---------------------------------------------------------------------------------
DEFAULT_K = 10
DEFAULT_ALPHA = 0.95
DEFAULT_MAX_LEVEL = 3
DEFAULT_BINS = 10
DEFAULT_MAX_Q = 0.05
DEFAULT_BINNING = "quantile"
DEFAULT_MAX_LEVELS = 256
# the multiple-testing family (README, "Slice statistics"): "split" searches one part of the rows and
# tests the top DEFAULT_FAMILY_SIZE slices on the held-out part; "lattice" searches and tests all rows,
# over every slice with support ≥ min_sup up to max_level
FAMILIES = ("split", "lattice")
DEFAULT_FAMILY = "split"
DEFAULT_FAMILY_SIZE = 50
DEFAULT_TEST_FRACTION = 0.5
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class SliceConfig:
    """Settings of SliceLine. ``min_sup`` is a row count (int ≥ 1) or a fraction of rows (0 < f < 1);
    None means ⌈n/100⌉. ``bins``: bins per numeric column (``binning`` "quantile" or "width");
    ``compat="systemds"`` reproduces SystemDS's output; ``max_q``: BH q-value for ``significant``;
    ``max_levels``: features with more levels are skipped; ``drop_nulls``: nulls form no slice.
    ``family``: "split" or "lattice" (None: split, or lattice with ``compat``, which reproduces SystemDS on
    every row); ``family_size``: the search looks for the top max(k, family_size) slices (k with
    ``compat``), so that a slice's q-value is the same for every k ≤ family_size; ``test_fraction`` of the rows (drawn with
    ``split_seed``) are held out for testing and estimating under "split"; ``max_memory``: bytes the search may use
    (None: 80 % of the memory available when it starts)."""

    k: int = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    min_sup: float | int | None = None
    max_level: int = DEFAULT_MAX_LEVEL
    bins: int = DEFAULT_BINS
    compat: str | None = None
    max_q: float | None = DEFAULT_MAX_Q
    binning: str = DEFAULT_BINNING
    drop_nulls: bool = False
    max_levels: int = DEFAULT_MAX_LEVELS
    family: str | None = None
    family_size: int = DEFAULT_FAMILY_SIZE
    test_fraction: float = DEFAULT_TEST_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    progress: bool = True
    max_memory: int | None = None


# ---- coverage -------------------------------------------------------------------------------
DEFAULT_COVERAGE_T = 2
DEFAULT_MIN_COUNT = 1
DEFAULT_COVERAGE_LIMIT = 1000
DEFAULT_COVERAGE_MAX_LEVELS = 64
DEFAULT_COVERAGE_TABLE_ROWS = 5_000_000


@dataclass(frozen=True)
class CoverageConfig:
    """Settings of the coverage stage. ``t``: largest number of features per combination (1–4);
    ``min_count``: items a combination needs to count as covered; ``odd``: the ODD YAML file (None:
    every feature's observed values, no exclusions); ``min_prob``: labels below this probability count
    as unknown; ``soft``: count each item by the product of its labels' probabilities; ``limit``: most
    missing combinations listed; ``error``: the error column (None: ``error`` when there is one);
    ``max_levels``: without an ODD, features with more values are skipped; ``table_rows``: at most
    this many combinations in coverage.parquet before it keeps only t ≤ 2 and the missing ones."""

    t: int = DEFAULT_COVERAGE_T
    min_count: int = DEFAULT_MIN_COUNT
    odd: Path | None = None
    min_prob: float | None = None
    soft: bool = False
    limit: int = DEFAULT_COVERAGE_LIMIT
    error: str | None = None
    max_levels: int = DEFAULT_COVERAGE_MAX_LEVELS
    table_rows: int = DEFAULT_COVERAGE_TABLE_ROWS
    progress: bool = True


# ---- compare --------------------------------------------------------------------------------
DEFAULT_MIN_DIFF = 0.0  # smallest |new − old| error-rate change that counts as worse/better
DEFAULT_MIN_PSI = 0.0  # smallest population stability index that counts as drift
DEFAULT_MIN_SHARED = 100  # items both runs must hold before their error changes are searched


@dataclass(frozen=True)
class CompareConfig:
    """Settings of a comparison with a baseline run. A slice is worse/better when its Benjamini–Hochberg
    q-value is ≤ ``max_q`` and its error changed by at least ``min_diff``; an attribute drifted when its
    q-value is ≤ ``max_q`` and its PSI ≥ ``min_psi``; features with more than ``max_levels`` values
    give no level-1 slices. Where the runs share at least ``min_shared`` items, a SliceLine search over
    their error changes adds its top ``k`` slices of at most ``max_level`` predicates."""

    max_q: float = DEFAULT_MAX_Q
    min_diff: float = DEFAULT_MIN_DIFF
    min_psi: float = DEFAULT_MIN_PSI
    max_levels: int = DEFAULT_MAX_LEVELS
    k: int = DEFAULT_K
    max_level: int = DEFAULT_MAX_LEVEL
    min_shared: int = DEFAULT_MIN_SHARED


# ---- run ------------------------------------------------------------------------------------
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_CARLA_CLASSES = ("Pedestrian",)
DEFAULT_FASHION_LIMIT = 2000
DEFAULT_FASHION_SEED = 0
DEFAULT_RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class DatasetConfig:
    """Adapter options; each adapter reads the fields it documents and ignores the rest.

    ``detections`` (carla): folder of the model's KITTI-format detections; ``predictions``
    (celeba): the model's per-image predictions/errors file; ``errors`` (folder): the
    ``errors.csv``/``.parquet`` (default ``ROOT/errors.csv``); ``limit``: at most this many
    items (fashion-mnist default ``DEFAULT_FASHION_LIMIT``; None elsewhere = all); ``follow_links``
    (folder): read images that are symbolic links leading outside ROOT (left out otherwise).
    """

    detections: Path | None = None
    predictions: Path | None = None
    errors: Path | None = None
    classes: tuple[str, ...] = DEFAULT_CARLA_CLASSES
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    limit: int | None = None
    seed: int = DEFAULT_FASHION_SEED
    follow_links: bool = False


@dataclass(frozen=True)
class RunConfig:
    """The whole job: a dataset through encode → annotate → errors → slices → coverage → report.

    ``schema`` None means the dataset's default schema; ``out`` None means ``runs/<dataset>``;
    ``auto_model`` True means: the default CLIP weights when they can be had, else ConSE.
    ``baseline``: an earlier run directory to compare this run with (``compare.json``, and a section of
    the report), with the settings ``compare``.
    ``coverage``: the coverage stage's settings (its features: the ODD's, else the slices' features).
    """

    dataset: str = "fashion-mnist"
    root: Path | None = None
    out: Path | None = None
    schema: str | None = None
    data: DatasetConfig = field(default_factory=DatasetConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    coverage: CoverageConfig = field(default_factory=CoverageConfig)
    auto_model: bool = True
    report: bool = True
    executor: str = "local"
    ray_address: str | None = None  # executor "ray": cluster address (None: RAY_ADDRESS, else a local cluster)
    ray_workers: int | None = None  # encoder actors (None: one per GPU, or per free CPU)
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_for_decode: float | None = None  # CPUs per decode task (None: 1)
    ray_shards: str | None = None  # shard files' folder: a path or pyarrow filesystem URI (None: RUN/shards-ray)
    quiet: bool = False
    log_json: bool = False
    baseline: Path | None = None
    compare: CompareConfig = field(default_factory=CompareConfig)
