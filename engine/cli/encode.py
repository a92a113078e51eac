"""``clipengine encode`` and ``clipengine encode-text``: options → ``EncodeConfig`` → the encode stage."""

from __future__ import annotations

from pathlib import Path

import click

from clipengine import config as defaults
from clipengine.cli.options import model_config, model_options, runtime_options


@click.command("encode")
@click.argument("source", metavar="INPUT", type=click.Path(exists=True, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: embeddings.npy, items.parquet, skipped.parquet, model.json.")
@model_options()
@runtime_options
@click.option("--boxes", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="CSV/Parquet with path,x0,y0,x1,y1 (pixels): each box is one item (object crop).")
@click.option("--box-margin", type=click.FloatRange(min=0), default=defaults.DEFAULT_BOX_MARGIN, show_default=True,
              help="Widen each box by this fraction of its size per side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=defaults.DEFAULT_BATCH_SIZE, show_default=True,
              help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decode threads [one per core].")
@click.option("--shard-size", type=click.IntRange(min=1), default=defaults.DEFAULT_SHARD_SIZE, show_default=True,
              help="Items per resumable shard (a shard is also written every "
                   f"{defaults.DEFAULT_SHARD_SECONDS:g} s).")
@click.option("--dtype", "output_dtype", type=click.Choice(["float32", "float16"]),
              default=defaults.DEFAULT_OUTPUT_DTYPE, show_default=True, help="dtype of embeddings.npy.")
@click.option("--exact-decode", is_flag=True,
              help="Decode JPEGs at full size and resize with PIL (pixels bit-identical to open_clip's preprocess; slower).")
@click.option("--follow-links", is_flag=True,
              help="Read symbolic links under INPUT that lead outside it (else they are left out, listed in "
                   "skipped.parquet).")
@click.option("--decode", type=click.Choice(defaults.DECODE_CHOICES), default=defaults.DEFAULT_DECODE,
              show_default=True,
              help="Where JPEGs are decoded: cpu (PIL in threads); device (torchvision on the encoder's device, "
                   "nvJPEG on a GPU; other formats on the CPU); auto (the device when it is a GPU).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def encode(source, out_dir, model, pretrained, weights, backend, device, precision, boxes, box_margin, batch_size,
           workers, shard_size, output_dtype, exact_decode, follow_links, decode, quiet):
    """Encode images (or object crops) under INPUT into L2-normalized CLIP embeddings.

    INPUT is a folder (searched recursively for image files) or a text file of image paths.
    Interrupted runs resume; rerunning with more images encodes only the new ones.

    \b
    Example:
      clipengine encode photos/ --out emb/ --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clipengine encode list.txt --out emb/ --weights clip.safetensors --boxes boxes.csv
    """
    from clipengine.config import EncodeConfig
    from clipengine.encode.inputs import items_from_input
    from clipengine.encode.stage import encode_items

    config = EncodeConfig(model=model_config(model, pretrained, weights), backend=backend, device=device,
                          precision=precision, batch_size=batch_size, workers=workers, box_margin=box_margin,
                          shard_size=shard_size, output_dtype=output_dtype, exact_decode=exact_decode,
                          decode=decode, progress=not quiet)
    from clipengine import artifacts

    given = [p for p in (source, boxes) if p and Path(p).is_file()]
    artifacts.check_inputs_kept(out_dir, given, artifacts.ENCODE_OUTPUTS)
    items, left_out = items_from_input(source, boxes=boxes, follow_links=follow_links)
    with artifacts.locked(out_dir):
        result = encode_items(items, out_dir, config, left_out=left_out)
    record = result.model_record
    click.echo(
        f"encoded {result.encoded} items ({result.newly_encoded} new, {result.reused} reused), "
        f"skipped {result.skipped}, in {result.seconds:.1f} s "
        f"[{record.get('name', record.get('model_id'))}, {record.get('backend')} {record.get('precision')} "
        f"on {record.get('device')}] → {out_dir}"
    )


@click.command("encode-text")
@click.argument("texts", nargs=-1, required=True)
@model_options()
@runtime_options
@click.option("--like", "like_dir", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Use the model of this embeddings folder (its model.json) instead of --model/--weights.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Save the (M, D) float32 array as .npy instead of printing it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: [{text, embedding}].")
def encode_text(texts, model, pretrained, weights, backend, device, precision, like_dir, out_file, as_json):
    """Encode text prompts into L2-normalized CLIP text embeddings (one row per text).

    \b
    Example:
      clipengine encode-text "a photo of a cat" "a photo of a dog" --weights clip.safetensors --json
      clipengine encode-text "a red car" --like emb/ --out car.npy
    """
    import json

    from clipengine.config import EncodeConfig
    from clipengine.encode.encoders import create_encoder, text_encoder_from_dir

    if like_dir:
        encoder = text_encoder_from_dir(like_dir, device=device)
    else:
        config = EncodeConfig(model=model_config(model, pretrained, weights), backend="torch" if backend == "auto"
                              else backend, device=device, precision=precision or "fp32")
        encoder = create_encoder(config)
    embeddings = encoder.encode_texts(list(texts))
    if out_file:
        from clipengine.bindings.files import save_npy

        save_npy(out_file, embeddings)
        click.echo(f"saved {embeddings.shape[0]}×{embeddings.shape[1]} float32 text embeddings → {out_file}")
    elif as_json:
        rows = [{"text": t, "embedding": [round(float(v), 7) for v in row]} for t, row in zip(texts, embeddings)]
        click.echo(json.dumps(rows))
    else:
        for text, row in zip(texts, embeddings):
            click.echo(text + "\t" + " ".join(f"{v:.6f}" for v in row))
