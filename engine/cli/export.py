"""`clipengine export`: the image graph the TensorRT backend builds from, written to a file."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("out", metavar="OUT.onnx", type=click.Path(dir_okay=False, path_type=str))
@click.option("--model", "model", default="ViT-B-32", show_default=True,
              help="open_clip architecture name, an open_clip architecture .json, or a local Hugging Face CLIP "
                   "directory.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (downloaded once where a network exists).")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
              help="Local open_clip or OpenAI checkpoint (.safetensors, .pt, .bin); never unpickles code.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="fp16: fp16 weights and activations, LayerNorm, softmax and reductions in fp32 through "
                   "casts in the graph (what the tensorrt backend builds in fp16); fp32: all float32.")
def export(out, model, pretrained, weights, precision):
    """Write the image graph of a model as ONNX: (N, S, S, 3) uint8 RGB in, (N, D) float32 L2-normalized
    embeddings out, mean/std inside.

    The file is the very graph the tensorrt backend parses into a strongly typed plan (the same cached
    export), so it can be inspected, run with ONNX Runtime or built with trtexec.

    \b
    Example:
      clipengine export vit-b-32-fp16.onnx --model ViT-B-32 --weights clip.safetensors
      clipengine export tower.onnx --model arch.json --weights w.safetensors --precision fp32
    """
    import shutil
    from pathlib import Path

    import onnx

    from clipengine import envs
    from clipengine.bindings.files import atomic_path
    from clipengine.bindings.onnx_export import ensure_image_onnx, op_precisions
    from clipengine.config import ModelConfig
    from clipengine.errors import ClipengineError
    from clipengine.models import MODEL_FAMILIES, load_model, resolve_model

    if model in MODEL_FAMILIES:
        raise ClipengineError(f"--model {model}: only open_clip and Hugging Face CLIP models export to ONNX")
    spec = resolve_model(ModelConfig(model=model, pretrained=pretrained, weights=Path(weights) if weights else None))
    towers = load_model(spec)
    cached = ensure_image_onnx(towers, envs.cache_dir(), precision=precision)
    with atomic_path(out) as staged:
        shutil.copyfile(cached, staged)
    graph = onnx.load(out)
    summary = ", ".join(
        f"{op} {'/'.join(f'{kind} {count}' for kind, count in sorted(kinds.items()))}"
        for op, kinds in sorted(op_precisions(graph).items())
        if op in ("MatMul", "Gemm", "Conv", "LayerNormalization", "Softmax") or op.startswith("Reduce")
    )
    click.echo(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB, {precision}, {spec.name}): "
               f"images (N, {towers.image_size}, {towers.image_size}, 3) uint8 → embeddings (N, {towers.embed_dim}) "
               f"float32\n  compute types: {summary}")
