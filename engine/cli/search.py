"""`clipengine search`: text-to-image retrieval over stored embeddings."""

from __future__ import annotations

import click

from clipengine.cli.options import device_option


@click.command("search")
@click.argument("emb_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True, help="Results per query.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@device_option
@click.option("--index", type=click.Choice(["auto", "int8", "none"]), default="auto", show_default=True,
              help="auto: on the CPU over ≥ 100,000 items, an int8 screening copy (built once into "
                   "EMB_DIR/search_index/, or the cache directory when EMB_DIR is read-only) then an exact re-rank; none: one float32 pass. Both are exact.")
def search(emb_dir, queries, k, as_json, device, index):
    """Rank the items of EMB_DIR by similarity to each text query (exact, cosine).

    Uses the text tower of the model that made EMB_DIR (its model.json). Results equal a brute-force
    scan on every path (equal scores: the earlier item first).

    \b
    Example:
      clipengine search emb/ "a child holding an umbrella" -k 20
      clipengine search emb/ "a red car at night" "a foggy road" --json
    """
    import json

    from clipengine.annotate.search import search as run_search

    frame = run_search(emb_dir, list(queries), k, device=device, index=index)
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), ensure_ascii=False, indent=1))
        return
    for query in queries:
        hits = frame.filter(frame["query"] == query)
        click.echo(f"{query}")
        for row in hits.iter_rows(named=True):
            box = f"  box {row['box']}" if row.get("box") is not None else ""
            click.echo(f"  {row['rank']:>3}  {row['score']:.4f}  {row['path']}{box}")
