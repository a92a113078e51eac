"""``clipengine run``: the whole semantic test in one resumable command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipengine import config as defaults
from clipengine.cli.options import (
    coverage_config,
    coverage_options,
    model_config,
    model_options,
    runtime_options,
    slice_config,
    slice_options,
)
from clipengine.datasets import DATASETS


def _dataset_help() -> str:
    import textwrap

    lines = []
    for name, entry in DATASETS.items():
        text = f"{entry[2]} Default schema: {entry[1]}."
        lines += textwrap.wrap(text, width=96, initial_indent=f"  {name:<14} ", subsequent_indent=" " * 17)
    return "\n".join(lines)


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--config job.yaml``: option names as keys (dashes or underscores); the command line wins."""
    if not value:
        return
    from clipengine.errors import ClipengineError
    from clipengine.yamlfile import read_yaml

    data = read_yaml(value, what="--config") or {}
    if not isinstance(data, dict):
        raise ClipengineError(f"--config {value}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    defaults = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ClipengineError(f"--config {value}: unknown option '{key}' (known: {', '.join(sorted(known))})")
        if name == "classes" and isinstance(item, list):
            item = ",".join(str(v) for v in item)
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


@click.command(
    "run",
    help=f"""The whole semantic test: encode a dataset's images (or object crops), label them
zero-shot with a prompt schema, join the model-under-test's per-item errors, find the weak
slices with SliceLine, measure which combinations of conditions the data covers (t-way
coverage: over the ODD's features with --odd, else the schema's attributes and the dataset's
own features) and write a summary and report into RUN (default runs/<dataset>).

Rerunning the same command skips finished stages whose inputs did not change, encodes only
new images, and resumes a killed run. Without --model/--weights the default CLIP weights are
used when they can be had, else the offline ConSE encoder (with a notice).

\b
Datasets:
{_dataset_help()}

\b
Example:
  clipengine run --dataset fashion-mnist
  clipengine sample runs/fashion-mnist --n 200 --out labels/   # label in labels/labels.html, then:
  clipengine run --dataset fashion-mnist --labels labels.csv
  clipengine run --dataset carla --root carla_export/ --detections dets/ --out runs/carla
  clipengine run --dataset folder --root photos/ --schema scene --k 20
  clipengine run --dataset folder --root photos/ --schema scene --odd odd.yaml --t 3 --min-count 5
  clipengine run --config nightly.yaml --quiet --log-json
  clipengine run --dataset folder --root photos/ --out runs/2024-05-02 --baseline runs/2024-05-01
  clipengine run --dataset folder --root /shared/photos --out /shared/runs/nightly --executor ray --ray-address auto
  clipengine run --dataset folder --root /shared/photos --executor ray --ray-address auto \\
      --ray-shards s3://my-bucket/clipengine/nightly-shards
""",
)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_config_file, help="YAML file with the same options (names as keys); the command line wins.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="fashion-mnist", show_default=True,
              help="Dataset adapter (see above).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset folder (fashion-mnist: optional, default Debian's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory [default: runs/<dataset>].")
@click.option("--schema", default=None, help="Built-in schema name or a YAML file [default: the dataset's].")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="carla: folder of KITTI-format detections with a score column.")
@click.option("--predictions", type=click.Path(path_type=Path), default=None,
              help="celeba: CSV/Parquet with image_id + error, or image_id + one attribute column.")
@click.option("--errors", "errors_file", type=click.Path(path_type=Path), default=None,
              help="folder: the errors table [default: ROOT/errors.csv or .parquet].")
@click.option("--classes", default=",".join(defaults.DEFAULT_CARLA_CLASSES), show_default=True,
              help="carla: object classes, comma-separated.")
@click.option("--iou", type=click.FloatRange(0, 1), default=defaults.DEFAULT_IOU_THRESHOLD, show_default=True,
              help="carla: IoU a detection needs to match.")
@click.option("--follow-links", is_flag=True, default=False,
              help="folder: read images that are symbolic links leading outside ROOT (left out and counted otherwise).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help=f"At most this many items (fashion-mnist default {defaults.DEFAULT_FASHION_LIMIT}).")
@click.option("--seed", type=int, default=defaults.DEFAULT_FASHION_SEED, show_default=True,
              help="fashion-mnist: training seed of the model under test.")
@model_options(model_default=None)
@runtime_options
@click.option("--batch-size", type=click.IntRange(min=1), default=defaults.DEFAULT_BATCH_SIZE, show_default=True,
              help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decode threads [one per core].")
@click.option("--strategy", default=None, help="Prompt aggregation (mean, max, topm, naive; per attribute a=max).")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A labelled sample (`clipengine sample`'s labels.csv filled in, or Label Studio's JSON export): "
                   "labelled items keep their labels, attributes adapt to them (--adapt), each slice gets its "
                   "true group's error rate with an interval ('not confirmed' where it need not be weak), and the "
                   "eval stage measures each attribute's reliability on them.")
@click.option("--adapt", type=click.Choice(["auto", "none", "prototype", "gda", "tip"]), default=defaults.DEFAULT_ADAPT,
              show_default=True, help="With --labels: how attributes adapt (auto: where cross-validation says it helps).")
@slice_options
@click.option("--baseline", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An earlier run directory to compare this run with (clipengine compare): writes RUN/compare.json "
                   "and adds a 'since the baseline' section to the report.")
@click.option("--min-diff", type=click.FloatRange(min=0), default=defaults.DEFAULT_MIN_DIFF, show_default=True,
              help="--baseline: smallest change of a slice's error rate that counts as worse/better.")
@click.option("--min-psi", type=click.FloatRange(min=0), default=defaults.DEFAULT_MIN_PSI, show_default=True,
              help="--baseline: smallest population stability index that counts as drift.")
@coverage_options
@click.option("--no-report", is_flag=True, default=False, help="Skip report.html.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where encoding runs: this process, or a Ray cluster (needs clipengine[ray]).")
@click.option("--ray-address", default=None, help="ray: cluster address [default: RAY_ADDRESS, else a new local cluster].")
@click.option("--ray-workers", type=int, default=None, help="ray: encoder actors [default: one per GPU, or per free CPU].")
@click.option("--gpus-per-worker", type=float, default=None, help="ray: GPUs per encoder actor [default: 1 with GPUs, else 0].")
@click.option("--cpus-for-decode", type=float, default=None, help="ray: CPUs per decode task [default: 1].")
@click.option("--ray-shards", default=None, metavar="URI",
              help="ray: where workers write their shard files (the checkpoints a restarted job skips): a folder, "
                   "or a URI pyarrow opens on every worker and the driver — file:///mnt/nfs/shards, "
                   "s3://bucket/prefix, gs://bucket/prefix, hdfs://namenode:8020/path. Committed by an atomic "
                   "rename (local, NFS, HDFS) or by write-once objects + a completion marker (S3, GCS). "
                   "The final files always land in RUN. [default: RUN/shards-ray]")
@click.option("--quiet", is_flag=True, default=False, help="No progress bars or stage lines.")
@click.option("--log-json", is_flag=True, default=False, help="JSON-lines events on stdout (machine-readable).")
def run(dataset, root, out, schema, detections, predictions, errors_file, classes, iou, follow_links, limit, seed, model,
        pretrained, weights, backend, device, precision, batch_size, workers, strategy, labels, adapt, k, alpha, min_sup,
        max_level, bins, binning, drop_nulls, compat, max_q, family, family_size, test_fraction, split_seed, max_memory,
        t, min_count, odd, min_prob, soft, baseline,
        min_diff, min_psi, no_report, executor, ray_address, ray_workers, gpus_per_worker, cpus_for_decode, ray_shards,
        quiet, log_json) -> None:
    from clipengine.config import AnnotateConfig, CompareConfig, DatasetConfig, EncodeConfig, RunConfig
    from clipengine.errors import ClipengineError
    from clipengine.run.job import RunLog, run_job

    encode = EncodeConfig(model=model_config(model, pretrained, weights), backend=backend, device=device,
                          precision=precision, batch_size=batch_size, workers=workers)
    slices = slice_config(k=k, alpha=alpha, min_sup=min_sup, max_level=max_level, bins=bins, binning=binning,
                          drop_nulls=drop_nulls, compat=compat, max_q=max_q, family=family, family_size=family_size,
                          test_fraction=test_fraction, split_seed=split_seed, max_memory=max_memory)
    config = RunConfig(
        dataset=dataset,
        root=root,
        out=out,
        schema=schema,
        data=DatasetConfig(detections=detections, predictions=predictions, errors=errors_file,
                           classes=tuple(c.strip() for c in classes.split(",") if c.strip()), iou_threshold=iou,
                           limit=limit, seed=seed, follow_links=follow_links),
        encode=encode,
        annotate=AnnotateConfig(strategy=strategy, device=device, labels=labels, adapt=adapt),
        slices=slices,
        coverage=coverage_config(t=t, min_count=min_count, odd=odd, min_prob=min_prob, soft=soft),
        auto_model=model is None and weights is None and pretrained is None,
        report=not no_report,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
        gpus_per_worker=gpus_per_worker,
        cpus_for_decode=cpus_for_decode,
        ray_shards=ray_shards,
        quiet=quiet,
        log_json=log_json,
        baseline=baseline,
        compare=CompareConfig(max_q=max_q, min_diff=min_diff, min_psi=min_psi),
    )
    log = RunLog(quiet=quiet, log_json=log_json)
    try:
        result = run_job(config, log=log)
    except ClipengineError as error:
        log.event("run", status="failed", reason=str(error))
        raise
    except Exception as error:  # a nightly job needs one line and a non-zero exit, not a traceback
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        log.event("run", status="failed", reason=reason)
        click.echo(f"clipengine: error: {reason}", err=True)
        sys.exit(1)
    if log_json:
        return
    from clipengine import artifacts

    reused = f"; reused {', '.join(result.reused)}" if result.reused else ""
    if result.read_only:
        click.echo(f"{result.run_dir}: all stages up to date ({', '.join(result.reused)}); read-only, nothing written")
    else:
        click.echo(f"{result.run_dir}: ran {', '.join(result.ran) or 'nothing'}{reused} ({result.seconds:.1f} s)")
    _print_top_slices(result.run_dir)
    if baseline is not None:
        _print_comparison(result.run_dir)
    click.echo(f"summary: {result.run_dir / artifacts.SUMMARY}")
    if (result.run_dir / artifacts.REPORT).is_file():
        click.echo(f"report:  {result.run_dir / artifacts.REPORT}")


def _print_top_slices(run_dir: Path, top: int = 3) -> None:
    from clipengine.artifacts import read_slices
    from clipengine.errors import ClipengineError

    try:
        _, records = read_slices(run_dir)
    except ClipengineError:
        return
    for rank, record in enumerate(records[:top], start=1):
        text = " AND ".join(f"{k} = {v}" for k, v in record.get("predicates", {}).items())
        marks = [] if record.get("significant") else ["not significant"]
        if record.get("confirmed") is False:
            marks.append("not confirmed by the labels")
        mark = f" ({'; '.join(marks)})" if marks else ""
        click.echo(f"  {rank}. {text}: {record.get('size')} items, error {100 * (record.get('error_mean') or 0):.1f} %{mark}")


def _print_comparison(run_dir: Path) -> None:
    from clipengine.artifacts import read_comparison
    from clipengine.errors import ClipengineError

    try:
        found = read_comparison(run_dir)
    except ClipengineError:
        return
    if found is None:
        return
    counts = found[0].get("findings", {})
    click.echo(f"since the baseline: {counts.get('worse', 0)} slices worse, {counts.get('better', 0)} better, "
               f"{counts.get('new', 0)} new weak, {counts.get('drift', 0)} attributes drifted "
               f"(clipengine compare gives the details and an exit code)")
