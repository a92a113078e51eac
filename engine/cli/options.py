"""Options shared by several commands, each defined once with its default taken from the stage's
config dataclass (:mod:`clipengine.config`): the model, where it runs, SliceLine's settings and coverage's.

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


_SIZE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_memory(ctx: click.Context | None, param: click.Parameter | None, value) -> int | None:
    """``--max-memory``: ``"8G"``, ``"500M"``, ``"2.5G"`` or bytes → bytes; None keeps the default."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        number = -1.0
    if not number > 0:
        raise click.BadParameter(f"{value!r} is not a size such as 8G or 500M", param_hint="--max-memory")
    return int(number * _SIZE_UNITS[unit])


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
        click.option("--family", type=click.Choice(config.FAMILIES), default=None,
                     help="Multiple-testing family. split: search part of the items, test and estimate each found "
                          "slice on the held-out rest; lattice: every item, every slice with at least --min-sup "
                          "items [split; lattice with --compat]."),
        click.option("--family-size", type=click.IntRange(min=1), default=config.DEFAULT_FAMILY_SIZE,
                     show_default=True, help="Slices the search looks for whatever --k is, so that q-values do not "
                                             "change with --k up to this many."),
        click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=config.DEFAULT_TEST_FRACTION, show_default=True,
                     help="split: share of the items held out for testing."),
        click.option("--split-seed", type=int, default=config.DEFAULT_SPLIT_SEED, show_default=True,
                     help="split: seed of the random split."),
        click.option("--max-memory", default=None, metavar="SIZE", callback=parse_memory,
                     help="Memory the search may use, e.g. 8G [80% of the memory available at start]; a lattice "
                          "level that would need more is refused before it starts, naming the --min-sup / "
                          "--max-level that fit."),
    ])(function)


def labels_option(function: Callable) -> Callable:
    """``--labels FILE``: a labelled sample whose true values correct the slices."""
    return click.option(
        "--labels", "labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Labels file (CSV/Parquet: path [, box], true_<attribute> columns, optional inclusion_prob): each "
             "slice also gets its true group's size and error rate with a 95 % interval, and is marked "
             "'not confirmed' when that interval does not lie above the overall error rate.")(function)


def slice_config(*, k, alpha, min_sup, max_level, bins, binning, drop_nulls, compat, max_q, family=None,
                 family_size=config.DEFAULT_FAMILY_SIZE, test_fraction=config.DEFAULT_TEST_FRACTION,
                 split_seed=config.DEFAULT_SPLIT_SEED, max_memory=None, progress: bool = True) -> config.SliceConfig:
    return config.SliceConfig(k=k, alpha=alpha, min_sup=min_sup, max_level=max_level, bins=bins, binning=binning,
                              drop_nulls=drop_nulls, compat=compat, max_q=max_q, family=family,
                              family_size=family_size, test_fraction=test_fraction, split_seed=split_seed,
                              max_memory=max_memory, progress=progress)


def coverage_options(function: Callable) -> Callable:
    """The coverage stage's settings that ``clipengine coverage`` and ``clipengine run`` share
    (→ :func:`coverage_config`)."""
    return _stack([
        click.option("--t", "t", type=click.IntRange(1, 4), default=config.DEFAULT_COVERAGE_T, show_default=True,
                     help="Coverage: largest number of features per combination (reported for every t up to it)."),
        click.option("--min-count", type=click.IntRange(min=1), default=config.DEFAULT_MIN_COUNT, show_default=True,
                     help="Coverage: items a combination needs to count as covered; fewer is listed as missing (0) "
                          "or thin."),
        click.option("--odd", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Coverage: ODD file (YAML) with the features, their allowed values and excluded "
                          "combinations."),
        click.option("--min-prob", type=click.FloatRange(0, 1), default=None,
                     help="Coverage: labels with <feature>_prob below P count as unknown."),
        click.option("--soft", is_flag=True,
                     help="Coverage: count each item as the product of its labels' probabilities (expected counts)."),
    ])(function)


def coverage_config(*, t, min_count, odd, min_prob, soft, **changes) -> config.CoverageConfig:
    return config.CoverageConfig(t=t, min_count=min_count, odd=Path(odd) if odd else None, min_prob=min_prob,
                                 soft=soft, **changes)
