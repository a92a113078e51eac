"""Scale-out: the local executor against the Ray executor with 1 and 2 encoder workers, same run.

    flock /tmp/clipengine-bench.lock python bench/scale.py [--model vit-b-32|tiny] [--images 300] [--schema scene] [--json]

What is measured (one process; a local Ray cluster started once on this machine with 3 logical
CPUs, its start-up reported apart; random-init weights saved as safetensors; torch fp32 on the CPU;
JPEG files of scikit-image sample photos at 500×400..1000×800, as bench/encode.py makes them):

- ``local``: ``clipengine.encode.stage.encode_items`` with its defaults (decode threads, 2 torch threads),
  then the annotate stage on the written embeddings (``clipengine.annotate.annotate_dir``).
- ``ray-1``: one encoder actor of 2 CPUs (2 torch threads) + decode tasks of 1 CPU; the actor labels
  each shard right after encoding it (annotation in the same pass) and the driver writes metadata.parquet.
- ``ray-2``: two encoder actors of 1 CPU each (1 torch thread each) + decode tasks of 1 CPU; same.

Annotation uses ``--schema`` (default ``scene``); its prompt embeddings are made and cached before the
timed runs, as a second run of a job finds them. ``--no-annotate`` times encoding alone.

Every configuration encodes ``--small`` and then ``--images`` items into fresh run directories; the
wall time of the whole call includes model loading (actor start-up for Ray). From the two sizes:
``marginal`` seconds per item = slope (what millions of items cost), ``fixed`` = the intercept
(start-up: actors, imports, model load). Ratios are against ``local`` measured in the same run; the
Ray overhead per item is ``marginal(ray) - marginal(local)``. Rows are checked against local's
(minimum cosine) and labels against local's (fraction equal). The machine has 2 cores, so 2 workers cannot beat 1 here: the figures show the cost
of going through Ray, not the gain of more machines.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_IMAGES = 300
DEFAULT_SMALL = 60
DEFAULT_BATCH = 32
DEFAULT_ITEMS_PER_SHARD = 50
RAY_CPUS = 3  # 2 cores: 2 CPUs of encoder actors + 1 of decode tasks (logical; the OS shares the cores)
TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CONFIGS = {  # name -> Ray executor options (None = the local executor)
    "local": None,
    "ray-1": {"num_workers": 1, "cpus_per_worker": 2.0},
    "ray-2": {"num_workers": 2, "cpus_per_worker": 1.0},
}


def _bench_encode_module():
    """bench/encode.py (its JPEG maker and ViT-B-32 weights), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_encode", Path(__file__).with_name("encode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(kind: str, folder: Path):
    import torch

    from clipengine.config import ModelConfig
    from clipengine.encode.models import build_open_clip_model, save_checkpoint

    if kind == "vit-b-32":
        return ModelConfig(model="ViT-B-32", weights=_bench_encode_module().make_weights(folder))
    torch.manual_seed(0)
    weights = save_checkpoint(build_open_clip_model(TINY_ARCHITECTURE), folder / "tiny.safetensors")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY_ARCHITECTURE))
    return ModelConfig(model=str(config), weights=weights)


def encode_once(name: str, items, out: Path, config, annotate=None) -> float:
    """Seconds to encode ``items`` (and label them, with ``annotate`` = (AnnotateConfig, encoder))."""
    from clipengine.executors import InPassAnnotation, create_executor

    options = CONFIGS[name]
    encode = create_executor("local") if options is None else create_executor(
        "ray", items_per_shard=DEFAULT_ITEMS_PER_SHARD, **options)
    if options is not None and annotate is not None:
        from clipengine.annotate.stage import resolve_schema

        annotate_cfg, encoder = annotate
        encode = functools.partial(encode, annotation=InPassAnnotation(
            targets=(("metadata.parquet", resolve_schema(annotate_cfg)),), text_encoder=lambda record: encoder,
            config=annotate_cfg))
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = encode(items, out, config)
    if options is None and annotate is not None:
        from clipengine.annotate.stage import annotate_dir

        annotate_dir(out, annotate[0], text_encoder=annotate[1])
    seconds = time.perf_counter() - started
    assert result.encoded == items.height, (name, result)
    assert annotate is None or (out / "metadata.parquet").is_file()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vit-b-32", "tiny"), default="vit-b-32")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--small", type=int, default=DEFAULT_SMALL)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration and size; the fastest counts")
    parser.add_argument("--schema", default="scene", help="schema the pass labels with (built-in name or YAML)")
    parser.add_argument("--no-annotate", action="store_true", help="time encoding alone")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if not 0 < args.small < args.images:
        parser.error("need 0 < --small < --images")

    import polars as pl
    import ray

    from clipengine.config import AnnotateConfig, EncodeConfig

    work = Path(tempfile.mkdtemp(prefix="clipengine-scale-"))
    try:
        paths = _bench_encode_module().make_jpegs(work / "jpegs", args.images)
        config = EncodeConfig(model=make_model(args.model, work), backend="torch", device="cpu", precision="fp32",
                              batch_size=args.batch_size, progress=False)
        items = pl.DataFrame({"path": paths})
        annotate = None
        if not args.no_annotate:
            from clipengine.annotate.class_embeddings import prompt_embeddings
            from clipengine.annotate.stage import resolve_schema
            from clipengine.encode.encoders import create_encoder

            encoder = create_encoder(config)  # the text tower; the prompts are cached before timing
            annotate = (AnnotateConfig(schema=args.schema, device="cpu", progress=False), encoder)
            prompt_embeddings(resolve_schema(annotate[0]), encoder, encoder.model_record["model_id"])
        started = time.perf_counter()
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray_start = time.perf_counter() - started
        seconds: dict[str, dict[int, float]] = {name: {} for name in CONFIGS}
        try:
            for _ in range(max(1, args.repeat)):  # interleaved, so that load from elsewhere hits every config
                for count in (args.small, args.images):
                    for name in CONFIGS:
                        took = encode_once(name, items.head(count), work / f"out-{name}", config, annotate)
                        seconds[name][count] = min(took, seconds[name].get(count, took))
        finally:
            ray.shutdown()
        reference = np.load(work / "out-local" / "embeddings.npy")
        agreement = {name: float(np.min(np.sum(np.load(work / f"out-{name}" / "embeddings.npy") * reference, axis=1)))
                     for name in CONFIGS}
        same_labels = {name: _same_labels(work / f"out-{name}", work / "out-local") if annotate else None
                       for name in CONFIGS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = {}
    for name, timing in seconds.items():
        slope = (timing[args.images] - timing[args.small]) / (args.images - args.small)
        rows[name] = {
            "seconds": round(timing[args.images], 2),
            "items_per_s": round(args.images / timing[args.images], 1),
            "marginal_items_per_s": round(1.0 / slope, 1) if slope > 0 else None,
            "fixed_s": round(timing[args.images] - slope * args.images, 2),
            "min_cosine_to_local": round(agreement[name], 6),
            "labels_equal_to_local": same_labels[name],
        }
    local = rows["local"]
    for name, row in rows.items():
        row["ratio_vs_local"] = round(row["items_per_s"] / local["items_per_s"], 2)
        marginal = (seconds[name][args.images] - seconds[name][args.small]) / (args.images - args.small)
        local_marginal = (seconds["local"][args.images] - seconds["local"][args.small]) / (args.images - args.small)
        row["overhead_ms_per_item"] = round(1000 * (marginal - local_marginal), 2)
    summary = {"model": args.model, "images": args.images, "small": args.small, "batch_size": args.batch_size,
               "repeat": args.repeat, "annotate": None if args.no_annotate else args.schema,
               "ray_cluster_start_s": round(ray_start, 2), "configs": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    labelled = "no annotation" if args.no_annotate else f"annotation with schema {args.schema} in the pass"
    print(f"model {args.model} (random init, torch fp32, CPU), {args.images} JPEGs (and {args.small} for the slope), "
          f"batch {args.batch_size}, best of {args.repeat}, {labelled}; Ray cluster start-up {ray_start:.1f} s "
          "(not in the times below)")
    print(f"{'config':<8} {'seconds':>8} {'items/s':>8} {'marginal/s':>10} {'fixed s':>8} {'vs local':>9} "
          f"{'overhead ms/item':>17} {'min cos':>9} {'labels =':>9}")
    for name, row in rows.items():
        marginal = row["marginal_items_per_s"] if row["marginal_items_per_s"] is not None else float("nan")
        same = row["labels_equal_to_local"]
        print(f"{name:<8} {row['seconds']:>8.1f} {row['items_per_s']:>8.1f} {marginal:>10.1f} {row['fixed_s']:>8.1f} "
              f"{row['ratio_vs_local']:>8.2f}x {row['overhead_ms_per_item']:>17.2f} {row['min_cosine_to_local']:>9.6f} "
              f"{'-' if same is None else f'{same:.4f}':>9}")


def _same_labels(got: Path, expected: Path) -> float:
    """Fraction of (item, attribute) labels in ``got``'s metadata.parquet equal to ``expected``'s."""
    import polars as pl

    a, b = pl.read_parquet(got / "metadata.parquet"), pl.read_parquet(expected / "metadata.parquet")
    columns = [c for c in a.columns if a[c].dtype == pl.String and c != "path"]
    return round(float(np.mean([(a[c] == b[c]).mean() for c in columns])), 4)


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    sys.exit(main())
