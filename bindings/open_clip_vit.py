"""An open_clip ViT image tower as data: its structure and its tensors, read from a checkpoint without
building the model (and without importing open_clip, which costs seconds and is not needed to run the
tower fused: :class:`clipengine.bindings.torch_vit_cpu.FusedVisionTransformer` takes an
:class:`OpenClipVision`).

:func:`vision_from_checkpoint` covers the plain CLIP ViT (what the fused forward reproduces): learnable
positions, LayerNorm, GELU / QuickGELU, optional LayerScale, class-token or average pooling, no
attentional pooler, no custom blocks. For anything else, and for a checkpoint whose image tensors are
not exactly the architecture's (a format open_clip converts, positions it resizes), it says why and the
caller builds the open_clip model instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VISUAL_PREFIX = "visual."

# vision_cfg keys whose every value the fused forward handles (patch dropout is off in eval, the timm
# settings are unused without a timm model)
_FREE_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
              "patch_dropout", "no_ln_pre", "final_ln_after_pool", "pool_type", "attn_pooler_queries",
              "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
              "timm_drop", "timm_drop_path"}
# vision_cfg keys the fused forward handles at these values only (open_clip's defaults)
_FIXED_KEYS = {"attentional_pool": (False,), "pos_embed_type": ("learnable",), "output_tokens": (False,),
               "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "block_type": (None, "default"),
               "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
               "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,), "timm_model_name": (None,)}
_LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which open_clip keeps without norm_kwargs


@dataclass(frozen=True)
class OpenClipVision:
    """An open_clip ``VisionTransformer``'s structure and tensors.

    ``tensors``: the tower's ``state_dict()`` entries (names without the ``visual.`` prefix), float
    tensors as stored: ``conv1.weight`` (W, 3, P, P), ``class_embedding`` (W,), ``positional_embedding``
    (1 + G, W), ``ln_pre.*`` (absent without a pre-norm), ``transformer.resblocks.{i}.*``, ``ln_post.*``,
    ``proj`` (W, D) (absent without a projection). ``activation``: "gelu", "gelu_tanh" or "quick_gelu";
    ``pool``: "tok" or "avg"; the norms are LayerNorms with ``norm_eps``, in float32 when
    ``norm_in_fp32`` (open_clip's ``LayerNormFp32``)."""

    tensors: dict[str, Any]
    heads: int
    activation: str
    pool: str
    final_norm_after_pool: bool
    norm_eps: float
    norm_in_fp32: bool
    image_size: int

    @property
    def layers(self) -> int:
        return sum(1 for name in self.tensors if name.startswith("transformer.resblocks.") and name.endswith(".ln_1.weight"))

    @property
    def width(self) -> int:
        return int(self.tensors["conv1.weight"].shape[0])

    @property
    def patch(self) -> int:
        return int(self.tensors["conv1.weight"].shape[-1])

    @property
    def mlp_width(self) -> int:
        return int(self.tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])

    @property
    def output_dim(self) -> int:
        proj = self.tensors.get("proj")
        return self.width if proj is None else int(proj.shape[1])


def vision_from_checkpoint(architecture: dict, state: dict) -> tuple[OpenClipVision | None, str | None]:
    """(the image tower of ``state`` read as ``architecture``'s plain ViT, None), or (None, why not).

    ``architecture``: an open_clip model config (``embed_dim``, ``vision_cfg``, optional ``quick_gelu``);
    ``state``: the whole model's tensors by name (the image tower's under ``visual.``)."""
    reason = _architecture_unsupported_reason(architecture)
    if reason:
        return None, reason
    vision_cfg = architecture["vision_cfg"]
    expected = _expected_shapes(architecture)
    found = {name[len(VISUAL_PREFIX):]: tensor for name, tensor in state.items() if name.startswith(VISUAL_PREFIX)}
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        return None, f"image tensors differ from the architecture's (missing {missing[:2]}, extra {extra[:2]})"
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            return None, f"visual.{name} is {tuple(found[name].shape)}, the architecture's is {shape}"
        if not found[name].is_floating_point():
            return None, f"visual.{name} is not a float tensor"
    width = int(vision_cfg["width"])
    return OpenClipVision(
        tensors=found,
        heads=width // int(vision_cfg.get("head_width", 64)),
        activation="quick_gelu" if architecture.get("quick_gelu") else "gelu",
        pool=vision_cfg.get("pool_type", "tok"),
        final_norm_after_pool=bool(vision_cfg.get("final_ln_after_pool", False)),
        norm_eps=_LAYER_NORM_EPS,
        norm_in_fp32=False,
        image_size=_image_side(vision_cfg),
    ), None


def _architecture_unsupported_reason(architecture: dict) -> str | None:
    vision_cfg = architecture.get("vision_cfg")
    if not isinstance(vision_cfg, dict) or "embed_dim" not in architecture:
        return "no vision_cfg / embed_dim"
    if "multimodal_cfg" in architecture:
        return "a CoCa architecture"
    for key, value in vision_cfg.items():
        if key in _FREE_KEYS:
            continue
        if key not in _FIXED_KEYS:
            return f"vision_cfg.{key}"
        if value not in _FIXED_KEYS[key]:
            return f"vision_cfg.{key} = {value!r}"
    if not isinstance(vision_cfg.get("layers", 12), int):
        return "a ResNet image tower"
    if vision_cfg.get("pool_type", "tok") not in ("tok", "avg"):
        return f"pool type {vision_cfg.get('pool_type')!r}"
    if _image_side(vision_cfg) is None or not isinstance(vision_cfg.get("patch_size", 16), int):
        return "a non-square image or patch size"
    width, head_width = int(vision_cfg.get("width", 768)), int(vision_cfg.get("head_width", 64))
    if width % head_width:
        return "width is not a multiple of head_width"
    return None


def _image_side(vision_cfg: dict) -> int | None:
    size = vision_cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(size) == 2 and size[0] == size[1] else None
    return int(size)


def _expected_shapes(architecture: dict) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the image tower's ``state_dict()`` (open_clip's defaults filled in)."""
    vision_cfg = architecture["vision_cfg"]
    width = int(vision_cfg.get("width", 768))
    patch = int(vision_cfg.get("patch_size", 16))
    side = _image_side(vision_cfg)
    mlp = int(width * vision_cfg.get("mlp_ratio", 4.0))
    grid = (side // patch) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (grid + 1, width),
        "ln_post.weight": (width,), "ln_post.bias": (width,),
        "proj": (width, int(architecture["embed_dim"])),
    }
    if not vision_cfg.get("no_ln_pre", False):
        shapes.update({"ln_pre.weight": (width,), "ln_pre.bias": (width,)})
    layer_scale = vision_cfg.get("ls_init_value") is not None
    for index in range(int(vision_cfg.get("layers", 12))):
        block = f"transformer.resblocks.{index}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width), block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp), block + "mlp.c_proj.bias": (width,),
        })
        if layer_scale:
            shapes.update({block + "ls_1.gamma": (width,), block + "ls_2.gamma": (width,)})
    return shapes
