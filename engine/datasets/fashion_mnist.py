"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``) with a small model under test.

The model under test is a softmax-regression classifier on 14×14 mean-pooled pixels, trained
here on the 60,000 training images (full-batch gradient descent with Nesterov momentum from
zeros: deterministic, seconds on a CPU, ≈ 83 % test accuracy). Items are the first
``limit`` test images (ids ``test/000123``); their error is 1 when the classifier gets the
garment wrong. The true garment class is ground truth for eval. The test images are written
once as PNGs into ``<cache>/datasets/fashion-mnist/<hash>/`` (each write atomic).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from clipengine.config import DEFAULT_FASHION_LIMIT
from clipengine.datasets.base import Dataset
from clipengine.errors import ClipengineError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
TRAIN_STEPS = 60
LEARNING_RATE = 0.5
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) → its uint8 array ((N,) labels or (N, 28, 28) images)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ClipengineError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ClipengineError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ClipengineError(f"{path}: header declares shape {shape} but the file has {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def pool_features(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 → (N, 196) float64: 2×2 mean pooling, scaled to [0, 1]."""
    n = images.shape[0]
    return images.reshape(n, 14, 2, 14, 2).astype(np.float64).mean(axis=(2, 4)).reshape(n, 196) / 255.0


def train_softmax(features: np.ndarray, labels: np.ndarray, *, classes: int = 10, steps: int = TRAIN_STEPS,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch Nesterov gradient descent.

    features: (N, F) float64, labels: (N,) int → (weights (F+1, C), mean (F,), std (F,)).
    ``seed`` permutes the training rows (the result is the same up to float rounding: full batch).
    """
    order = np.random.default_rng(seed).permutation(features.shape[0])
    x, y = features[order], labels[order]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x = np.hstack([(x - mean) / std, np.ones((x.shape[0], 1))])  # (N, F+1)
    onehot = np.eye(classes)[y]  # (N, C)
    weights = np.zeros((x.shape[1], classes))
    velocity = np.zeros_like(weights)
    for _ in range(steps):
        ahead = weights + MOMENTUM * velocity
        logits = x @ ahead
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        grad = x.T @ (prob - onehot) / x.shape[0] + WEIGHT_DECAY * ahead
        velocity = MOMENTUM * velocity - LEARNING_RATE * grad
        weights = weights + velocity
    return weights, mean, std


def predict_softmax(model: tuple[np.ndarray, np.ndarray, np.ndarray], features: np.ndarray) -> np.ndarray:
    """(N, F) float64 → (N,) int64 predicted classes."""
    weights, mean, std = model
    x = np.hstack([(features - mean) / std, np.ones((features.shape[0], 1))])
    return np.argmax(x @ weights, axis=1).astype(np.int64)


class FashionMnistDataset(Dataset):
    name = "fashion-mnist"
    default_schema = "fashion"
    summary = "Fashion-MNIST test images; errors of a softmax-regression classifier trained here"
    needs_root = False

    def __init__(self, root=None, config=None, *, progress=True):
        from clipengine import envs

        super().__init__(root, config, progress=progress)
        self.data_dir = self.root if self.root is not None else envs.fashion_mnist_dir()
        for key, name in FILES.items():
            path = self.data_dir / name
            if not path.is_file() and not path.with_suffix("").is_file():
                raise ClipengineError(
                    f"{path} does not exist (install Debian's dataset-fashion-mnist or pass --root DIR with the idx files)"
                )
        self.limit = DEFAULT_FASHION_LIMIT if self.config.limit is None else self.config.limit
        if self.limit < 1:
            raise ClipengineError(f"--limit must be at least 1, got {self.limit}")
        self._test = None
        self._errors = None

    def _file(self, key: str) -> Path:
        path = self.data_dir / FILES[key]
        return path if path.is_file() else path.with_suffix("")

    def settings(self) -> dict:
        return {"limit": self.limit, "seed": self.config.seed, "steps": TRAIN_STEPS, "data_dir": str(self.data_dir)}

    def input_files(self) -> list[Path]:
        return [self._file(key) for key in FILES]

    def _test_split(self) -> tuple[np.ndarray, np.ndarray]:
        if self._test is None:
            images, labels = read_idx(self._file("test_images")), read_idx(self._file("test_labels"))
            if images.ndim != 3 or labels.shape[0] != images.shape[0]:
                raise ClipengineError(f"{self._file('test_images')}: images and labels disagree in count")
            count = min(self.limit, images.shape[0])
            self._test = (images[:count], labels[:count])
        return self._test

    def image_cache_dir(self) -> Path:
        from clipengine import envs

        digest = hashlib.sha256(self._file("test_images").read_bytes()).hexdigest()[:16]
        return envs.cache_dir() / "datasets" / "fashion-mnist" / digest

    def list_items(self):
        import io

        import polars as pl
        from PIL import Image

        from clipengine.bindings.files import write_bytes
        from clipengine.progress import track

        images, _ = self._test_split()
        folder = self.image_cache_dir() / "test"
        paths, files = [], []
        todo = []
        for i in range(images.shape[0]):
            path = f"test/{i:06d}"
            file = folder / f"{i:06d}.png"
            paths.append(path)
            files.append(str(file))
            if not file.is_file():
                todo.append(i)
        for i in track(todo, "fashion-mnist: writing PNGs", enabled=self.progress and len(todo) > 200):
            buffer = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buffer, format="PNG")
            write_bytes(files[i], buffer.getvalue())
        return pl.DataFrame({"path": paths, "file": files})

    def load_errors(self):
        import polars as pl

        if self._errors is None:
            model = self.classifier()
            images, labels = self._test_split()
            predicted = predict_softmax(model, pool_features(images))
            names = np.array(CLASSES)
            self._errors = pl.DataFrame(
                {
                    "path": [f"test/{i:06d}" for i in range(images.shape[0])],
                    "error": (predicted != labels).astype(np.float64),
                    "label": names[labels].tolist(),
                    "predicted": names[predicted].tolist(),
                    "ink": images.reshape(images.shape[0], -1).mean(axis=1) / 255.0,
                }
            )
        return self._errors

    def classifier(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model under test, trained once and kept in the cache (keyed by the training data's
        hash and the training settings)."""
        from clipengine.bindings.files import atomic_path

        key = hashlib.sha256(
            self._file("train_images").read_bytes() + self._file("train_labels").read_bytes()
            + repr((TRAIN_STEPS, LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, self.config.seed)).encode()
        ).hexdigest()[:16]
        cached = self.image_cache_dir().parent / f"classifier-{key}.npz"
        if cached.is_file():
            try:
                with np.load(cached) as stored:
                    return stored["weights"], stored["mean"], stored["std"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable: train again
        train_x = pool_features(read_idx(self._file("train_images")))
        train_y = read_idx(self._file("train_labels")).astype(np.int64)
        weights, mean, std = train_softmax(train_x, train_y, seed=self.config.seed)
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, weights=weights, mean=mean, std=std)
        return weights, mean, std

    def error_features(self) -> list[str]:
        return ["ink"]

    def load_truth(self):
        import polars as pl

        _, labels = self._test_split()
        return pl.DataFrame(
            {"path": [f"test/{i:06d}" for i in range(labels.shape[0])], "label": np.array(CLASSES)[labels].tolist()}
        )

    def truth_mapping(self) -> dict[str, str]:
        return {"garment": "label"}
