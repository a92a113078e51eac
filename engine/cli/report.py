"""``clipengine report``: write RUN/report.html for an existing run directory."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path, file_okay=False))
@click.option("--single-file", is_flag=True, help="Inline the thumbnails as data URIs: one file to send, no thumbs/ folder.")
@click.option("--open", "open_page", is_flag=True, help="Open the page in the default web browser afterwards.")
def report(run_dir: Path, single_file: bool, open_page: bool) -> None:
    """Write RUN/report.html (and RUN/thumbs/) from the files of a run directory.

    The page needs no network: styles, script, charts and (with --single-file)
    thumbnails are inside it. Writing it again for the same run gives the same page.

    \b
    Example:
      clipengine run --dataset fashion-mnist --out runs/fmnist
      clipengine report runs/fmnist --single-file --open
    """
    from clipengine.artifacts import locked
    from clipengine.errors import ClipengineError
    from clipengine.report import write_report

    if not run_dir.is_dir():
        raise ClipengineError(f"{run_dir}: not a run directory (it does not exist)")
    with locked(run_dir):
        page = write_report(run_dir, single_file=single_file)
    click.echo(f"report: {page} ({_size(page, single_file)})")
    if open_page:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())


def _size(page: Path, single_file: bool) -> str:
    total = page.stat().st_size
    from clipengine.artifacts import THUMBS_DIR

    thumbs = page.parent / THUMBS_DIR
    if not single_file and thumbs.is_dir():
        total += sum(p.stat().st_size for p in thumbs.iterdir() if p.is_file())
    return f"{total / 1024:.0f} KiB" + ("" if single_file else " with thumbs/")
