"""Encoders for the engine: the model resolved and loaded, backend, device and precision chosen.

Every encoder carries ``model_record`` (what ``model.json`` holds) beside the ``Encoder`` interface
of :mod:`clipengine.bindings`. :func:`choose_model` is the run job's rule for falling back to the
offline ConSE encoder when no CLIP weights can be had.
"""

from __future__ import annotations

import os

from clipengine import envs
from clipengine.artifacts import RECORD_AUTO_CHOICE, read_model_record
from clipengine.config import EncodeConfig, ModelConfig, RunConfig
from clipengine.devices import is_cuda, resolve_device
from clipengine.encode.models import resolve_model
from clipengine.errors import ClipengineError


def create_encoder(config: EncodeConfig, *, towers=None):
    """The ``Encoder`` for ``config`` (model resolved and loaded; backend, device, precision chosen).

    The returned object also carries ``model_record`` (a dict for ``model.json``).
    ``towers``: an already loaded ``ModelTowers`` to reuse (the caller guarantees it matches ``config.model``).
    """
    from clipengine import bindings
    from clipengine.encode.models import MODEL_FAMILIES, load_model, resolve_model

    device = resolve_device(config.device)
    if config.model.model in MODEL_FAMILIES:
        return _create_family_encoder(config.model.model, device, config.precision)
    if config.backend != "auto" and config.backend not in bindings.BACKENDS:
        raise ClipengineError(f"--backend must be auto or one of {', '.join(bindings.BACKENDS)}, not {config.backend!r}")
    if config.precision is not None and config.precision not in bindings.PRECISIONS:
        raise ClipengineError(f"--precision must be one of {', '.join(bindings.PRECISIONS)}, not {config.precision!r}")
    choice, spec = None, None
    if is_cuda(device) or (config.backend != "auto" and config.precision is not None):
        backend = bindings.select_backend(device, config.precision) if config.backend == "auto" else config.backend
        precision = config.precision or bindings.default_precision(backend, device)
    else:  # the CPU with something left to choose: measured on this CPU (clipengine.encode.auto)
        from clipengine.encode.auto import choose_cpu_path

        if config.backend != "auto":  # a backend that cannot run here says so before anything is measured
            problem = bindings.check_backend(config.backend, device, bindings.default_precision(config.backend, device))
            if problem:
                raise ClipengineError(problem)
        spec = resolve_model(config.model)
        if towers is None:
            towers = load_model(spec)
        choice = choose_cpu_path(towers, backend=None if config.backend == "auto" else config.backend,
                                 precision=config.precision, num_threads=envs.num_threads(), cache_dir=envs.cache_dir())
        backend, precision = choice.backend, choice.precision
    problem = bindings.check_backend(backend, device, precision)
    if problem:
        raise ClipengineError(problem)
    if spec is None:
        spec = resolve_model(config.model)
    if towers is None:
        towers = load_model(spec)
    encoder = bindings.load_backend(backend)(
        towers, device=device, precision=precision, num_threads=envs.num_threads(), cache_dir=envs.cache_dir()
    )
    encoder.model_record = {
        **spec.to_record(),
        "backend": backend,
        "device": device,
        "precision": precision,
        "embed_dim": int(encoder.embed_dim),
        "image_size": int(encoder.image_size),
        "logit_scale": towers.logit_scale,
    }
    if encoder.image_forward:  # which forward runs the image tower, and why
        encoder.model_record["image_forward"] = encoder.image_forward
    if getattr(encoder, "cpu_streams", 1) > 1:  # a batch's forward split into independent streams
        encoder.model_record["cpu_streams"] = encoder.cpu_streams
    if choice is not None:
        encoder.model_record[RECORD_AUTO_CHOICE] = choice.record()
    return encoder


def _create_family_encoder(family: str, device: str, precision: str | None):
    import importlib

    from clipengine.encode.models import MODEL_FAMILIES

    module_name, attribute = MODEL_FAMILIES[family].split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ClipengineError(f"--model {family}: its module {module_name} is not available ({error})") from None
    try:
        encoder = factory(device=device, precision=precision, num_threads=envs.num_threads(), cache_dir=envs.cache_dir())
    except ValueError as error:  # bindings cannot raise the engine's error type
        raise ClipengineError(f"--model {family}: {error}") from None
    record = dict(encoder.model_record)
    record.setdefault("model_id", family)
    record.setdefault("source", family)
    record.setdefault("name", family)
    record.setdefault("model", family)
    record.setdefault("backend", family)
    record.setdefault("device", device)
    record.setdefault("precision", precision or "fp32")
    record.setdefault("embed_dim", int(encoder.embed_dim))
    record.setdefault("image_size", int(encoder.image_size))
    encoder.model_record = record
    return encoder


def text_encoder_from_dir(emb_dir: str | os.PathLike, *, device: str = "auto"):
    """An ``Encoder`` of the same model as ``emb_dir``'s embeddings, for its text tower
    (``encode_texts(list[str]) -> (M, D) float32``, L2-normalized; torch, fp32)."""
    from clipengine import bindings
    from clipengine.encode.models import MODEL_FAMILIES, load_model, spec_from_record

    record = read_model_record(emb_dir)
    device = resolve_device(device)
    source = record.get("source", "open_clip")
    if source in MODEL_FAMILIES:
        return _create_family_encoder(source, device, record.get("precision"))
    spec = spec_from_record(record)
    towers = load_model(spec)
    encoder = bindings.load_backend("torch")(towers, device=device, precision="fp32", num_threads=envs.num_threads())
    encoder.model_record = {**record, "backend": "torch", "device": device, "logit_scale": towers.logit_scale}
    return encoder


# ---- the run job's model choice ---------------------------------------------------------------
def choose_model(config: RunConfig, previous: dict | None = None) -> tuple[ModelConfig, str | None]:
    """The model to encode with and a one-line notice when the offline ConSE encoder stands in.

    With ``auto_model`` (no --model/--weights given), the default CLIP weights are used when
    they can be had (cached, or downloadable when online); otherwise ConSE. A run directory that
    fell back to ConSE before (``previous``: the manifest's ``model_choice``) stays on it, so that
    rerunning the same command never switches models silently (give --model to change it).
    """
    model = config.encode.model
    if not config.auto_model or model.model == "conse":
        return model, None
    if previous and previous.get("auto") and previous.get("model") == "conse":
        return ModelConfig(model="conse"), previous.get("notice")
    try:
        resolve_model(model)
    except ClipengineError as error:
        reason = str(error).split(";")[0]
        notice = (f"notice: {reason}; using the offline ConSE encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2) "
                  "instead; give --model/--weights for CLIP")
        return ModelConfig(model="conse"), notice
    return model, None


def encoder_record(encoder, dtype: str | None = None) -> dict:
    """The model record of ``encoder`` for ``model.json``, with its ``embed_dim`` and ``image_size``
    (and the stored ``dtype`` of the rows when given)."""
    record = dict(getattr(encoder, "model_record", None) or {"model_id": type(encoder).__name__})
    record.update(embed_dim=int(encoder.embed_dim), image_size=int(encoder.image_size))
    if dtype is not None:
        record["dtype"] = dtype
    return record
