"""`clipengine export`: the image graph the TensorRT backend builds from, written to a file."""

from __future__ import annotations

import click

from clipengine.cli.options import model_config, model_options


@click.command("export")
@click.argument("out", metavar="OUT.onnx", type=click.Path(dir_okay=False, path_type=str))
@model_options()
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
    from clipengine.encode.models import MODEL_FAMILIES, load_model, resolve_model
    from clipengine.errors import ClipengineError

    if model in MODEL_FAMILIES:
        raise ClipengineError(f"--model {model}: only open_clip and Hugging Face CLIP models export to ONNX")
    from clipengine.artifacts import check_inputs_kept

    if weights:
        check_inputs_kept(Path(out).parent, [weights], [Path(out).name])
    spec = resolve_model(model_config(model, pretrained, weights))
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
