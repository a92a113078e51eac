"""`clipengine annotate`: label stored embeddings zero-shot with a prompt schema."""

from __future__ import annotations

import click

from clipengine.cli.options import device_option
from clipengine.config import DEFAULT_ADAPT


@click.command("annotate")
@click.argument("emb_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--schema", "schema", default="celeba", show_default=True,
              help="A built-in schema (celeba, fashion, pedestrian, scene) or a YAML file.")
@click.option("--strategy", default=None,
              help="Prompt aggregation: naive, mean, max, logsumexp or topm, for every attribute; "
                   "'attr=NAME' for one (comma-separated). Default: the schema's own.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Output Parquet file.  [default: EMB_DIR/metadata.parquet]")
@click.option("--model", default=None, help="Only to check: the model that made EMB_DIR (default: its model.json).")
@click.option("--pretrained", default=None, help="With --model: its pretrained tag.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None, help="With --model: a checkpoint.")
@click.option("--thresholds", type=click.Path(dir_okay=False, exists=True), default=None,
              help="thresholds.json from `clipengine eval --calibrate`: relabel binary attributes with them.")
@click.option("--labels", "labels", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A labels file: `clipengine sample`'s labels.csv filled in, or Label Studio's JSON export. "
                   "Labelled items keep their label; the attributes it labels adapt to it (--adapt).")
@click.option("--adapt", type=click.Choice(["auto", "none", "prototype", "gda", "tip"]), default=DEFAULT_ADAPT,
              show_default=True,
              help="With --labels: auto adapts an attribute where cross-validation on the labels beats zero-shot; "
                   "prototype, gda or tip always; none keeps zero-shot.")
@device_option
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None, help="Rows per kernel pass (memory bound).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def annotate(emb_dir, schema, strategy, out_path, model, pretrained, weights, thresholds, labels, adapt, device,
             chunk_rows, quiet):
    """Label every embedding in EMB_DIR with each attribute of a schema.

    Writes one row per item: path (and box), then per attribute <attr> (the winning class),
    <attr>_prob (its softmax probability) and <attr>_margin (its lead over the runner-up).
    Only the schema's prompts are encoded (with the text tower of the model in EMB_DIR/model.json,
    cached per model and schema); images are never re-encoded.

    With --labels, each attribute the file labels is adapted to the labelled image embeddings in
    closed form (prototypes, GDA or a Tip-Adapter cache blended with the text classifier) where
    cross-validation on the labels says it beats zero-shot; the choice and its cross-validated
    accuracy are printed and recorded in the file's metadata.

    \b
    Example:
      clipengine annotate emb/ --schema celeba --out emb/metadata.parquet
      clipengine annotate emb/ --schema my_schema.yaml --strategy mean,eyeglasses=max
      clipengine annotate emb/ --schema fashion --labels labels/labels.csv
    """
    from dataclasses import replace
    from pathlib import Path

    from clipengine.annotate.stage import annotate_dir, resolve_schema
    from clipengine.artifacts import METADATA
    from clipengine.config import AnnotateConfig, ModelConfig

    config = AnnotateConfig(schema=schema, strategy=strategy, device=device, progress=not quiet,
                            thresholds=Path(thresholds) if thresholds else None,
                            labels=Path(labels) if labels else None, adapt=adapt)
    if chunk_rows:
        config = replace(config, chunk_rows=chunk_rows)
    if model or weights or pretrained:
        config = replace(config, model=ModelConfig(model=model or ModelConfig().model, pretrained=pretrained,
                                                   weights=Path(weights) if weights else None))
    from clipengine.artifacts import check_inputs_kept, locked

    resolved = resolve_schema(config)
    destination = out_path or str(Path(emb_dir) / METADATA)
    given = [p for p in (thresholds, schema, labels) if p and Path(p).is_file()]
    check_inputs_kept(Path(destination).parent, given, [Path(destination).name])
    with locked(Path(destination).parent):
        frame = annotate_dir(emb_dir, config, destination)
    strategies = sorted(set(resolved.strategies.values()))
    click.echo(f"wrote {destination}: {frame.height} rows × {len(resolved.attributes)} attributes "
               f"(schema {resolved.name} {resolved.hash}, strategy {'/'.join(strategies)})")
    for attribute in resolved.attributes:
        counts = frame[attribute.name].value_counts(sort=True).head(4).rows()
        shown = ", ".join(f"{name} {count}" for name, count in counts)
        mean_prob = frame[f"{attribute.name}_prob"].mean() if frame.height else float("nan")
        click.echo(f"  {attribute.name:<22} {shown}  (mean prob {mean_prob:.2f})")
    if labels:
        from clipengine.artifacts import read_adaptation

        adaptation, _, _ = read_adaptation(destination)
        for name, record in adaptation.items():
            click.echo(f"  {name}: {record['n_labels']} labels; {record['reason']}")
