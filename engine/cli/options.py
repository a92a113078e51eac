"""Options shared by several commands, each defined once with its default taken from the stage's
config dataclass (:mod:`clipengine.config`): the model, where it runs, and SliceLine's settings.

Only click and the config module are imported here, so ``clipengine --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from clipengine import config

BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")
DEVICE_HELP = "auto, cpu, cuda or cuda:N (a GPU by index)."


def _stack(options: list[Callable]) -> Callable:
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def model_options(*, model_default: str | None = config.DEFAULT_MODEL) -> Callable:
    """``--model``, ``--pretrained``, ``--weights`` (→ :func:`model_config`)."""
    return _stack([
        click.option("--model", "model", default=model_default, show_default=model_default is not None,
                     help="open_clip architecture name, an open_clip architecture .json, a local Hugging Face CLIP "
                          "directory, or 'conse' (the offline encoder)."),
        click.option("--pretrained", default=None,
                     help="open_clip pretrained tag (downloaded once where a network exists), "
                          "e.g. laion2b_s34b_b79k for ViT-B-32."),
        click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Local open_clip or OpenAI checkpoint (.safetensors, or plain tensors saved with "
                          "torch.save); pickled code and TorchScript archives are refused."),
    ])


def model_config(model: str | None, pretrained: str | None, weights: Path | None) -> config.ModelConfig:
    return config.ModelConfig(model=model or config.DEFAULT_MODEL, pretrained=pretrained,
                              weights=Path(weights) if weights else None)


def device_option(function: Callable) -> Callable:
    return click.option("--device", default=config.DEFAULT_DEVICE, show_default=True, help=DEVICE_HELP)(function)


def runtime_options(function: Callable) -> Callable:
    """``--backend``, ``--device``, ``--precision`` of an encoder."""
    return _stack([
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=config.DEFAULT_BACKEND,
                     show_default=True,
                     help="auto: on the CPU the fastest measured on this CPU (torch or onnxruntime); TensorRT on "
                          "CUDA (torch where TensorRT is not installed)."),
        device_option,
        click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=None,
                     help="Default: fp16 on CUDA; on the CPU the fastest of fp32, bf16 and int8 on this CPU "
                          "(measured once per CPU, cached) among those whose cosine to fp32 stays ≥ 0.9999."),
    ])(function)


def parse_min_sup(ctx: click.Context | None, param: click.Parameter | None, value) -> int | float | None:
    """``--min-sup``: a row count (``32``) or a fraction of rows (``0.01``); None keeps the default."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a row count nor a fraction", param_hint="--min-sup") from None
    if number >= 1 and number.is_integer():
        return int(number)
    if 0 < number < 1:
        return number
    raise click.BadParameter(f"{value!r} is neither a row count ≥ 1 nor a fraction in (0, 1)", param_hint="--min-sup")


def slice_options(function: Callable) -> Callable:
    """SliceLine's settings (→ :func:`slice_config`)."""
    return _stack([
        click.option("--k", "k", type=click.IntRange(min=1), default=config.DEFAULT_K, show_default=True,
                     help="Slices to report."),
        click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=config.DEFAULT_ALPHA,
                     show_default=True, help="Weight of error vs size in the score."),
        click.option("--min-sup", default=None, callback=parse_min_sup,
                     help="Minimum slice size: rows (N) or a fraction of rows (F) [⌈n/100⌉]."),
        click.option("--max-level", type=click.IntRange(min=0), default=config.DEFAULT_MAX_LEVEL, show_default=True,
                     help="Most predicates per slice (0 = unlimited)."),
        click.option("--bins", type=click.IntRange(min=2), default=config.DEFAULT_BINS, show_default=True,
                     help="Bins per numeric column with many values."),
        click.option("--binning", type=click.Choice(["quantile", "width"]), default=config.DEFAULT_BINNING,
                     show_default=True),
        click.option("--drop-nulls", is_flag=True, help="Nulls form no slice (default: null is a level of its own)."),
        click.option("--compat", type=click.Choice(["systemds"]), default=None,
                     help="Reproduce SystemDS's sliceLine output exactly (its bound and top-K quirks)."),
        click.option("--max-q", type=click.FloatRange(0, 1, min_open=True), default=config.DEFAULT_MAX_Q,
                     show_default=True, help="Benjamini–Hochberg q-value at or below which a slice is significant."),
    ])(function)


def slice_config(*, k, alpha, min_sup, max_level, bins, binning, drop_nulls, compat, max_q,
                 progress: bool = True) -> config.SliceConfig:
    return config.SliceConfig(k=k, alpha=alpha, min_sup=min_sup, max_level=max_level, bins=bins, binning=binning,
                              drop_nulls=drop_nulls, compat=compat, max_q=max_q, progress=progress)
