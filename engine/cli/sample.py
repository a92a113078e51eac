"""`clipengine sample`: draw items of a run for a person to label, as a sheet and a page."""

from __future__ import annotations

import click

from clipengine.config import DEFAULT_SAMPLE_SIZE


@click.command("sample")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--n", "n", type=click.IntRange(min=1), default=DEFAULT_SAMPLE_SIZE, show_default=True,
              help="Items to draw.")
@click.option("--seed", type=int, default=None, help="Seed of the draw [default: a fresh one, recorded in sample.json].")
@click.option("--focus", type=click.Choice(["uncertain"]), default=None,
              help="uncertain: draw half of the items from the fifth of the run with the lowest margin (a "
                   "stratified draw whose inclusion probabilities are recorded, so estimates stay unbiased).")
@click.option("--attributes", default=None, help="Attributes to label, comma-separated [default: all of the schema's].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the sheet.  [default: RUN_DIR/labels]")
def sample(run_dir, n, seed, focus, attributes, out_dir):
    """Draw a random sample of RUN_DIR's items for a person to label.

    RUN_DIR is a run directory (or an encode folder annotated by `clipengine annotate`). Writes into
    --out: labels.csv (path [, box], inclusion_prob, the model's label of each attribute and an empty
    true_<attr> column each), labels.html (a page that works offline: thumbnails with the model's
    labels pre-selected, corrected by click or keyboard, downloaded as the filled labels.csv),
    label_studio_tasks.json + label_studio_config.xml (the same for Label Studio, predictions as
    pre-annotations; its JSON export is read back by --labels) and sample.json (the draw: seed,
    design, population, inclusion probabilities, items).

    \b
    Example:
      clipengine sample runs/fashion-mnist --n 200 --out labels/
      # open labels/labels.html, label, download labels.csv, then:
      clipengine run --dataset fashion-mnist --labels ~/Downloads/labels.csv
    """
    from pathlib import Path

    from clipengine import artifacts
    from clipengine.report.labelsheet import make_sheet

    run = Path(run_dir)
    folder = Path(out_dir) if out_dir else run / "labels"
    chosen = [a.strip() for a in attributes.split(",") if a.strip()] if attributes else None
    with artifacts.locked(folder):
        sheet = make_sheet(run, folder, n=n, seed=seed, focus=focus, attributes=chosen)
    click.echo(f"drew {sheet.n} of {sheet.population} items ({sheet.design}, seed {sheet.seed}) to label "
               f"{', '.join(sheet.attributes)}")
    click.echo(f"label them in {folder / artifacts.LABELS_HTML} (offline; download labels.csv when done), "
               f"or fill {folder / artifacts.LABELS_CSV}; Label Studio: {folder / artifacts.LABEL_STUDIO_TASKS}")
