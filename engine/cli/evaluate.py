"""`clipengine eval`: compare zero-shot labels with ground truth."""

from __future__ import annotations

import click

from clipengine.cli.options import device_option


@click.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--truth", "truth", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Ground truth: CelebA's list_attr_celeba.txt, or a CSV / Parquet table.")
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
def evaluate(inputs, truth, mapping, key, out_dir, schema, strategies, calibrate, device):
    """Label quality per attribute: class counts, accuracy, per-class precision / recall / F1.

    INPUTS are metadata.parquet files from `clipengine annotate` (one per strategy, shown side by
    side), or one embeddings folder (EMB_DIR), which is then labelled under each of --strategies.

    \b
    Example:
      clipengine eval emb/ --truth list_attr_celeba.txt --schema celeba --strategies naive,mean
      clipengine eval naive.parquet mean.parquet --truth truth.csv --map eyeglasses=Eyeglasses,beard=!No_Beard
    """
    from pathlib import Path

    from clipengine.annotate.evaluate import evaluate_embeddings_dir, evaluate_files, parse_mapping
    from clipengine.config import AnnotateConfig
    from clipengine.errors import ClipengineError

    parsed = {}
    for text in mapping:
        parsed.update(parse_mapping(text))
    first = Path(inputs[0])
    if first.is_dir():
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
    from clipengine.artifacts import LABEL_QUALITY_CSV, LABEL_QUALITY_MD, THRESHOLDS, check_inputs_kept, locked

    check_inputs_kept(folder, [truth, *inputs], [LABEL_QUALITY_CSV, LABEL_QUALITY_MD, THRESHOLDS])
    with locked(folder):
        csv_path, md_path = report.write(folder)
    click.echo(report.to_markdown())
    click.echo(f"wrote {csv_path} and {md_path}")
