"""`clipengine eval`: compare zero-shot labels with ground truth."""

from __future__ import annotations

import click

from clipengine.cli.options import device_option


@click.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--truth", "truth", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Ground truth: CelebA's list_attr_celeba.txt, or a CSV / Parquet table.")
@click.option("--labels", "labels", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A labelled sample (`clipengine sample`'s labels.csv filled in, or Label Studio's JSON export): "
                   "per attribute and class, precision, recall and accuracy with 95 % intervals, and whether "
                   "the attribute is reliable.")
@click.option("--map", "mapping", multiple=True,
              help="attr=COLUMN, attr=!COLUMN (inverted binary) or attr=class:COL|class:COL (one-hot); "
                   "comma-separated or repeated. Default: the schema's truth keys, else same-named columns.")
@click.option("--key", default=None, help="Truth column with the item ids (default: path, else image_id).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for label_quality.csv / .md.  [default: beside the first input]")
@click.option("--schema", default="celeba", show_default=True, help="With an EMB_DIR input: the schema to label with.")
@click.option("--strategies", default=None,
              help="With an EMB_DIR input: strategies side by side (default: naive and the schema's own).")
@click.option("--calibrate", is_flag=True,
              help="Also fit a threshold per binary attribute on half the labelled rows and measure it on the "
                   "other half (writes thresholds.json).")
@device_option
def evaluate(inputs, truth, labels, mapping, key, out_dir, schema, strategies, calibrate, device):
    """Label quality per attribute: class counts, accuracy, per-class precision / recall / F1.

    INPUTS are metadata.parquet files from `clipengine annotate` (one per strategy, shown side by
    side), or one embeddings folder (EMB_DIR), which is then labelled under each of --strategies.

    With --labels (a labelled sample instead of, or beside, full ground truth), the labels of
    INPUTS (its metadata.parquet for a folder) are measured on the sample: 95 % intervals, items
    weighted by their inverse inclusion probabilities, adapted attributes judged on items they were
    not fitted on; an attribute whose precision interval is poor is marked unreliable.

    \b
    Example:
      clipengine eval emb/ --truth list_attr_celeba.txt --schema celeba --strategies naive,mean
      clipengine eval naive.parquet mean.parquet --truth truth.csv --map eyeglasses=Eyeglasses,beard=!No_Beard
      clipengine eval runs/fashion-mnist --labels labels/labels.csv
    """
    from pathlib import Path

    from clipengine.annotate.evaluate import evaluate_embeddings_dir, evaluate_files, parse_mapping
    from clipengine.config import AnnotateConfig
    from clipengine.errors import ClipengineError

    parsed = {}
    for text in mapping:
        parsed.update(parse_mapping(text))
    first = Path(inputs[0])
    if truth is None and labels is None:
        raise ClipengineError("eval: give ground truth (--truth) or a labelled sample (--labels)")
    reliability = None
    if labels is not None:
        from clipengine.annotate.reliability import evaluate_labels
        from clipengine.artifacts import METADATA

        if len(inputs) > 1:
            raise ClipengineError("eval --labels: give one metadata.parquet (or the folder that holds it)")
        reliability = evaluate_labels(first / METADATA if first.is_dir() else first, labels)
    if truth is None:
        report = None
        folder = Path(out_dir) if out_dir else (first if first.is_dir() else first.parent)
    elif first.is_dir():
        if len(inputs) > 1:
            raise ClipengineError("eval: give one embeddings folder, or metadata.parquet files, not both")
        chosen = [s.strip() for s in strategies.split(",") if s.strip()] if strategies else None
        report = evaluate_embeddings_dir(first, truth, schema=schema, strategies=chosen, mapping=parsed, key=key,
                                         config=AnnotateConfig(schema=schema, device=device, progress=False),
                                         calibrate=calibrate)
        folder = Path(out_dir) if out_dir else first
    else:
        report = evaluate_files(list(inputs), truth, mapping=parsed, key=key, calibrate=calibrate)
        folder = Path(out_dir) if out_dir else first.parent
    from clipengine.annotate.evaluate import write_label_quality
    from clipengine.artifacts import LABEL_QUALITY_CSV, LABEL_QUALITY_MD, THRESHOLDS, check_inputs_kept, locked

    check_inputs_kept(folder, [p for p in (truth, labels) if p] + list(inputs),
                      [LABEL_QUALITY_CSV, LABEL_QUALITY_MD, THRESHOLDS])
    with locked(folder):
        if report is not None:
            csv_path, md_path = report.write(folder)
        if reliability is not None:
            csv_path, md_path = write_label_quality(folder, report, reliability)
    if report is not None:
        click.echo(report.to_markdown())
    if reliability is not None:
        click.echo(reliability.to_markdown())
    click.echo(f"wrote {csv_path} and {md_path}")
