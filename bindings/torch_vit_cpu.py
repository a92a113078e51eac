"""A CLIP ViT image tower (open_clip's or transformers') re-run on the CPU with fewer, fused oneDNN calls.

The same weights and the same arithmetic as the module's eager forward, restructured for the CPU:

- the patch convolution (kernel = stride = patch) becomes one (N·G, 3·P·P) × (3·P·P, W) matmul:
  oneDNN's bf16 convolution of that shape is much slower than the equal GEMM;
- :meth:`FusedVisionTransformer.encode_uint8` takes the uint8 pixels themselves: the per-channel
  normalization is folded into the patch matmul's weights and bias, so the (N, 3, S, S) float
  normalize and cast passes disappear. The pixels enter centered (``x − 128``, exact in bf16), which
  keeps the folded bias small and its bf16 rounding below that of the unfolded path;
- every linear layer calls oneDNN's ``mkldnn._linear_pointwise`` directly, with the MLP's GELU fused
  into the matmul as a post-op (``F.linear`` goes through ``addmm``, a slower path on AMX), and the
  residual sums after the attention output and the MLP's down projection fused in as a binary post-op.
  QuickGELU (OpenAI's CLIP weights) is fused too, as oneDNN's swish post-op: see
  :func:`_fold_quick_gelu_slope`;
- attention is ``F.scaled_dot_product_attention`` on the (N, H, L, Dh) views of the fused QKV output;
- with class-token pooling, the last block runs its query, attention output and MLP on the class token
  only (every other token's output is discarded by the pool): ViT-B/32 does 6.5 % fewer FLOPs.

In bf16 this path is faster than the module's own forward with the same agreement to fp32 as the
module's bf16; in fp32 it keeps pace with the module's forward (with its last block on the class token)
and agrees with it to float32 rounding. It also runs from a checkpoint's tensors alone
(:meth:`FusedVisionTransformer.from_open_clip` on an :class:`~clipengine.bindings.open_clip_vit.OpenClipVision`),
without the module, so :class:`TorchEncoder` uses it in both precisions (``bench/encode.py`` measures
both forwards side by side: its ``torch-bf16-module`` configuration).

Covered: open_clip's plain CLIP ViT, and a transformers ``CLIPModel``'s vision tower + projection
(the engine's Hugging Face image tower holds it as ``tower.clip``). :func:`unsupported_reason` names
what a tower has outside that (attentional pooling, custom blocks, token outputs, ...), and the
caller then keeps the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipengine.bindings.cpu_streams import in_stream
from clipengine.bindings.open_clip_vit import OpenClipVision

_NORM_CLASSES = ("LayerNorm", "LayerNormFp32")  # torch's and open_clip's LayerNorm (one name), open_clip's fp32 one
_QUICK_GELU_SLOPE = 1.702  # QuickGELU (OpenAI's CLIP): x · sigmoid(1.702 x)


def fused_linear_available() -> bool:
    """True when this torch build has oneDNN's fused linear op (every x86 CPU build does)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def int8_linear_available() -> bool:
    """True when this torch build has oneDNN's int8 linear (``onednn.qlinear_pointwise``, x86 builds)."""
    if not fused_linear_available():
        return False
    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


def unsupported_reason(visual: Any) -> str | None:
    """None when :class:`FusedVisionTransformer` reproduces ``visual``'s forward, else why not."""
    if not fused_linear_available():
        return "this torch build has no oneDNN fused linear"
    return structure_unsupported_reason(visual)


def structure_unsupported_reason(visual: Any) -> str | None:
    """None when ``visual`` is a plain open_clip CLIP ViT or a transformers CLIPModel's vision tower
    (what this module reproduces, whatever the torch build), else what it has outside that."""
    hf = hf_vision(visual)
    if hf is not None:
        return _hf_unsupported_reason(*hf)
    if type(visual).__name__ != "VisionTransformer" or not hasattr(visual, "transformer"):
        return f"neither an open_clip VisionTransformer nor a transformers CLIPModel ({type(visual).__name__})"
    if getattr(visual, "attn_pool", None) is not None:
        return "attentional pooling"
    if getattr(visual, "output_tokens", False):
        return "token outputs"
    if visual.pool_type not in ("tok", "avg"):
        return f"pool type {visual.pool_type!r}"
    if not _is_patch_convolution(visual.conv1):
        return "patch embedding is not a bias-free, non-overlapping convolution"
    if not getattr(visual.transformer, "batch_first", True):
        return "sequence-first transformer"
    for name in ("ln_pre", "ln_post"):
        if not _is_norm(getattr(visual, name), allow_identity=True):
            return f"{name} is {type(getattr(visual, name)).__name__}"
    for index, block in enumerate(visual.transformer.resblocks):
        reason = _block_unsupported_reason(block)
        if reason:
            return f"block {index}: {reason}"
    norms = [module for module in _open_clip_norms(visual) if not isinstance(module, torch.nn.Identity)]
    if len({(type(module).__name__, float(module.eps)) for module in norms}) > 1:
        return "norm layers differ in kind or eps"
    if len({mlp_activation(block.mlp.gelu) for block in visual.transformer.resblocks}) > 1:
        return "blocks differ in activation"
    return None


def _open_clip_norms(visual) -> list:
    blocks = visual.transformer.resblocks
    return [visual.ln_pre, visual.ln_post, *(block.ln_1 for block in blocks), *(block.ln_2 for block in blocks)]


def open_clip_vision_of(visual) -> OpenClipVision:
    """The :class:`OpenClipVision` of a loaded open_clip ``VisionTransformer`` (check
    :func:`structure_unsupported_reason` first): its structure from the modules, its own tensors."""
    norm = next(module for module in _open_clip_norms(visual) if not isinstance(module, torch.nn.Identity))
    blocks = visual.transformer.resblocks
    size = visual.image_size
    return OpenClipVision(
        tensors={name: tensor.detach() for name, tensor in visual.state_dict().items()},
        heads=blocks[0].attn.num_heads if len(blocks) else 1,
        activation=mlp_activation(blocks[0].mlp.gelu) if len(blocks) else "gelu",
        pool=visual.pool_type,
        final_norm_after_pool=bool(getattr(visual, "final_ln_after_pool", False)),
        norm_eps=float(norm.eps),
        norm_in_fp32=type(norm).__name__ == "LayerNormFp32",
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
    )


def _block_unsupported_reason(block) -> str | None:
    if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
        return f"{type(block).__name__} is not the standard residual attention block"
    attention = block.attn
    if not isinstance(attention, torch.nn.MultiheadAttention) or not attention._qkv_same_embed_dim:
        return "attention is not a fused-QKV nn.MultiheadAttention"
    if attention.bias_k is not None or attention.add_zero_attn or not attention.batch_first:
        return "attention has extra key/value biases, zero attention or is sequence-first"
    if not (_is_norm(block.ln_1) and _is_norm(block.ln_2)):
        return "norm layers are not LayerNorm"
    for scale in (block.ls_1, block.ls_2):
        if not (isinstance(scale, torch.nn.Identity) or type(scale).__name__ == "LayerScale"):
            return f"layer scale {type(scale).__name__}"
    mlp = block.mlp
    if list(mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        return "MLP is not c_fc → activation → c_proj"
    if mlp_activation(mlp.gelu) is None:
        return f"activation {type(mlp.gelu).__name__}"
    return None


def hf_vision(tower) -> tuple[Any, Any] | None:
    """(CLIPVisionTransformer, visual projection) of a tower holding a transformers CLIPModel as
    ``tower.clip``, else None."""
    clip = getattr(tower, "clip", None)
    if type(clip).__name__ != "CLIPModel":
        return None
    return clip.vision_model, clip.visual_projection


def _hf_unsupported_reason(vision, projection) -> str | None:
    if not _is_patch_convolution(vision.embeddings.patch_embedding):
        return "patch embedding is not a bias-free, non-overlapping convolution"
    if projection.bias is not None:
        return "visual projection has a bias"
    if not (_is_norm(vision.pre_layrnorm) and _is_norm(vision.post_layernorm)):
        return "pre/post norms are not LayerNorm"
    for index, layer in enumerate(vision.encoder.layers):
        attention = layer.self_attn
        if type(layer).__name__ != "CLIPEncoderLayer" or not all(
            hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        ):
            return f"block {index}: {type(layer).__name__} is not the standard CLIP encoder layer"
        if not (_is_norm(layer.layer_norm1) and _is_norm(layer.layer_norm2)):
            return f"block {index}: norm layers are not LayerNorm"
        if mlp_activation(layer.mlp.activation_fn) is None:
            return f"block {index}: activation {type(layer.mlp.activation_fn).__name__}"
    return None


def _is_patch_convolution(conv) -> bool:
    return conv.bias is None and conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.groups == 1


def _is_norm(module, allow_identity: bool = False) -> bool:
    if allow_identity and isinstance(module, torch.nn.Identity):
        return True
    return isinstance(module, torch.nn.LayerNorm) and type(module).__name__ in _NORM_CLASSES


def mlp_activation(module) -> str | None:
    """The MLP's activation as the module computes it: "gelu", "gelu_tanh" or "quick_gelu"; None: other."""
    if isinstance(module, torch.nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    name = type(module).__name__
    if name in ("QuickGELU", "QuickGELUActivation"):  # open_clip's, transformers': x · sigmoid(1.702 x)
        return "quick_gelu"
    if name == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:  # transformers' exact GELU
        return "gelu"
    return None


@dataclass
class _Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    in_fp32: bool  # open_clip's LayerNormFp32: normalize in float32, cast back

    @classmethod
    def of(cls, module, dtype) -> "_Norm | None":
        if isinstance(module, torch.nn.Identity):
            return None
        return cls.of_tensors(module.weight, module.bias, float(module.eps), type(module).__name__ == "LayerNormFp32",
                              dtype)

    @classmethod
    def of_tensors(cls, weight, bias, eps: float, in_fp32: bool, dtype) -> "_Norm":
        weight_dtype = torch.float32 if in_fp32 else dtype
        return cls(None if weight is None else weight.detach().to(weight_dtype),
                   None if bias is None else bias.detach().to(weight_dtype), float(eps), in_fp32)

    def without_affine(self) -> "_Norm":
        """The same normalization without its weight and bias (they are folded into the next matmul)."""
        return _Norm(None, None, self.eps, self.in_fp32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_fp32:
            return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(x.dtype)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


# activation name → oneDNN's post-op attribute and algorithm
_INT8_ACTIVATIONS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                     "swish": ("swish", "")}


@dataclass
class _Int8Linear:
    """``x · Wᵀ + b`` on (R, K) float32 rows as an int8 matmul: W (O, K) quantized per output row to int8
    (symmetric, ``max|W_o| / 127``), x to uint8 per call (:mod:`clipengine.kernels.activation_quant`),
    integer products accumulated in int32 by oneDNN and rescaled to float32 with the bias, the GELU or the
    residual sum applied there (one pass over the output)."""

    packed_weight: torch.Tensor  # oneDNN's prepacked (O, K) int8 codes
    weight_scales: torch.Tensor  # (O,) float32
    weight_zero_points: torch.Tensor  # (O,) int64 zeros (symmetric)
    bias: torch.Tensor | None  # (O,) float32

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, norm: "_Norm | None" = None) -> "_Int8Linear":
        """The int8 form of ``weight`` (O, K) and ``bias`` (O,); with ``norm``, of the matmul on the norm's
        affine-free output: ``W · (γ x̂ + β) + b = (W diag γ) x̂ + (W β + b)``. Folding γ in before quantizing
        keeps a LayerNorm's large per-channel gains out of the activations' one scale, where they would
        coarsen every other channel's codes."""
        weight = weight.double()
        bias = None if bias is None else bias.double()
        if norm is not None and norm.bias is not None:
            bias = (0.0 if bias is None else bias) + weight @ norm.bias.double()
        if norm is not None and norm.weight is not None:
            weight = weight * norm.weight.double()
        scales = weight.abs().amax(dim=1) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(torch.ops.onednn.qlinear_prepack(codes, None), scales.float(),
                   torch.zeros(len(scales), dtype=torch.int64), None if bias is None else bias.float())

    def __call__(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """(R, K) float32 → (R, O) float32, with ``gelu`` / ``gelu_tanh`` / ``swish`` applied."""
        codes, scale, zero_point = _quantize_activations(x)
        attribute, algorithm = _INT8_ACTIVATIONS[activation]
        return torch.ops.onednn.qlinear_pointwise(codes, scale, zero_point, self.packed_weight, self.weight_scales,
                                                  self.weight_zero_points, self.bias, 1.0, 0, torch.float32,
                                                  attribute, [], algorithm)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + x · Wᵀ + b`` (R, O) float32, the sum added to the rescaled accumulator."""
        codes, scale, zero_point = _quantize_activations(x)
        return torch.ops.onednn.qlinear_pointwise.binary(
            codes, scale, zero_point, self.packed_weight, self.weight_scales, self.weight_zero_points,
            residual.contiguous(), self.bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], "")


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(R, K) float32 → (uint8 codes, scale, zero point), the range from torch's one-pass ``aminmax``. Inside
    one of several streams (:mod:`clipengine.bindings.cpu_streams`) the pass stays on the stream's thread."""
    from clipengine.kernels.activation_quant import affine_uint8_parameters, quantize_uint8

    x = x.contiguous()
    lo, hi = torch.aminmax(x)
    scale, zero_point = affine_uint8_parameters(lo.item(), hi.item())
    codes = quantize_uint8(x.numpy(), scale, zero_point, parallel=not in_stream())
    return torch.from_numpy(codes), scale, zero_point


@dataclass
class _Int8Block:
    """A block's int8 matmuls: QKV, the MLP's up and down projections; each takes the affine-free
    normalization's output where a norm precedes it. The attention's output projection, a twelfth of the
    block's matmul work, stays float32: its input (the attended values) quantizes worst, and in int8 it
    took a ViT-B/32's rows under ``auto``'s cosine bar. ``query``/``key_value``: the QKV split for a last
    block run on the class token only."""

    qkv: _Int8Linear
    fc: _Int8Linear
    proj: _Int8Linear
    query: _Int8Linear | None = None
    key_value: _Int8Linear | None = None


@dataclass
class _Block:
    norm_attention: _Norm
    qkv_weight: torch.Tensor | None  # (3W, W); None in the int8 form
    qkv_bias: torch.Tensor | None  # (3W,)
    out_weight: torch.Tensor  # (W, W)
    out_bias: torch.Tensor | None
    scale_attention: torch.Tensor | None  # (W,) LayerScale gamma
    norm_mlp: _Norm
    fc_weight: torch.Tensor | None  # (M, W); None in the int8 form
    fc_bias: torch.Tensor | None
    proj_weight: torch.Tensor | None  # (W, M); None in the int8 form
    proj_bias: torch.Tensor | None
    scale_mlp: torch.Tensor | None
    activation: str  # as run after the MLP's up projection: "gelu", "gelu_tanh" or "swish" (see _fold_quick_gelu_slope)
    heads: int
    int8: _Int8Block | None = None  # set by FusedVisionTransformer's int8 form, which then drops the float copies

    def split_query(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(W, W) query and (2W, W) key/value weights, with their biases, as contiguous copies."""
        width = self.qkv_weight.shape[1]
        bias = self.qkv_bias
        return (self.qkv_weight[:width].contiguous(), None if bias is None else bias[:width].contiguous(),
                self.qkv_weight[width:].contiguous(), None if bias is None else bias[width:].contiguous())


class FusedVisionTransformer:
    """``visual``'s forward in ``dtype`` on the CPU: (N, 3, S, S) normalized pixels in ``dtype`` →
    (N, D) in ``dtype`` (not L2-normalized), as ``visual(pixels)`` returns. Check
    :func:`unsupported_reason` first. Holds its own copies of the weights in ``dtype``.

    ``int8=True`` (with ``dtype`` float32): every block's QKV and MLP matmuls run as int8 matmuls
    (:class:`_Int8Linear`: weights per output row, activations per call, the LayerNorms' gains folded into
    the weights); the rest stays float32. It changes the numbers, more than bf16 does, so the engine takes it
    only where its rows keep the agreement with fp32 that ``auto`` asks of every precision."""

    def __init__(self, visual, dtype: torch.dtype = torch.bfloat16, *, int8: bool = False):
        reason = unsupported_reason(visual)
        if reason:
            raise ValueError(f"cannot fuse this image tower: {reason}")
        _check_int8(dtype, int8)
        self.dtype = dtype
        hf = hf_vision(visual)
        if hf is None:
            self._take_open_clip(open_clip_vision_of(visual))
        else:
            self._take_hf(*hf)
        self._finish(int8)

    @classmethod
    def from_open_clip(cls, vision: OpenClipVision, dtype: torch.dtype = torch.bfloat16, *,
                       int8: bool = False) -> "FusedVisionTransformer":
        """The tower ``vision`` describes (read from a checkpoint: no module built), in ``dtype``."""
        if not fused_linear_available():
            raise ValueError("cannot fuse this image tower: this torch build has no oneDNN fused linear")
        _check_int8(dtype, int8)
        fused = cls.__new__(cls)
        fused.dtype = dtype
        fused._take_open_clip(vision)
        fused._finish(int8)
        return fused

    def _finish(self, int8: bool) -> None:
        # only the class token leaves the last block when the pool takes it (a LayerNorm between is per token)
        self.class_token_last_block = self.pool == "tok" and bool(self.blocks)
        self.last_block_query = self.blocks[-1].split_query() if self.class_token_last_block else None
        self.int8 = int8
        if int8:
            self._quantize_blocks()

    def _quantize_blocks(self) -> None:
        """Each block's QKV and MLP matmuls in int8, the norms before them affine-free; the float copies
        of those weights are dropped."""
        for index, block in enumerate(self.blocks):
            split = self.last_block_query if index == len(self.blocks) - 1 else None
            block.int8 = _Int8Block(
                qkv=_Int8Linear.of(block.qkv_weight, block.qkv_bias, block.norm_attention),
                fc=_Int8Linear.of(block.fc_weight, block.fc_bias, block.norm_mlp),
                proj=_Int8Linear.of(block.proj_weight, block.proj_bias),
                query=None if split is None else _Int8Linear.of(split[0], split[1], block.norm_attention),
                key_value=None if split is None else _Int8Linear.of(split[2], split[3], block.norm_attention),
            )
            block.norm_attention = block.norm_attention.without_affine()
            block.norm_mlp = block.norm_mlp.without_affine()
            block.qkv_weight = block.fc_weight = block.proj_weight = None
        self.last_block_query = None  # its int8 form is the last block's query / key_value

    def _cast(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(self.dtype).contiguous()

    def _take_patches(self, conv_weight, class_embedding, positional_embedding) -> None:
        """``conv_weight``: (W, 3, P, P), the patch convolution's (stride P, no bias)."""
        self.patch = tuple(conv_weight.shape[-2:])
        self.width = conv_weight.shape[0]
        self._patch_weight_fp32 = conv_weight.detach().reshape(self.width, -1).float()  # (W, 3·P·P), (c, y, x)
        self.patch_weight = self._cast(self._patch_weight_fp32)
        self.folded_patch_weight = self.folded_patch_bias = None
        self.class_embedding = self._cast(class_embedding)  # (W,)
        self.positional_embedding = self._cast(positional_embedding)  # (1 + G, W)

    def fold_normalization(self, mean, std) -> None:
        """Prepare :meth:`encode_uint8` for pixels normalized as ``(x / 255 − mean) / std`` per channel:
        with c = x − 128, that is ``x_norm = c · a + b`` (a = 1 / (255 std), b = (128 / 255 − mean) / std),
        so ``W · x_norm = (W · diag(a)) · c + W · b``, computed in float64 from the fp32 weights."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        per_column = self.patch[0] * self.patch[1]  # the weight's columns run (c, y, x)
        column_scale = (1.0 / (255.0 * std)).repeat_interleave(per_column)
        column_shift = ((128.0 / 255.0 - mean) / std).repeat_interleave(per_column)
        weight = self._patch_weight_fp32.double()
        self.folded_patch_weight = self._cast(weight * column_scale)
        self.folded_patch_bias = self._cast(weight @ column_shift)

    def _take_open_clip(self, vision: OpenClipVision) -> None:
        tensors = vision.tensors

        def norm(prefix: str) -> "_Norm | None":
            if prefix + ".weight" not in tensors:
                return None
            return _Norm.of_tensors(tensors[prefix + ".weight"], tensors.get(prefix + ".bias"), vision.norm_eps,
                                    vision.norm_in_fp32, self.dtype)

        def tensor(name: str) -> torch.Tensor | None:
            return self._cast(tensors.get(name))

        self._take_patches(tensors["conv1.weight"], tensors["class_embedding"], tensors["positional_embedding"])
        self.norm_pre = norm("ln_pre")
        self.norm_post = norm("ln_post")
        self.pool = vision.pool
        self.final_norm_after_pool = vision.final_norm_after_pool
        self.proj = tensor("proj")  # (W, D) or None
        self.blocks = []
        for index in range(vision.layers):
            block = f"transformer.resblocks.{index}."
            activation, fc_weight, fc_bias, proj_weight = _fold_quick_gelu_slope(
                vision.activation, tensors[block + "mlp.c_fc.weight"], tensors.get(block + "mlp.c_fc.bias"),
                tensors[block + "mlp.c_proj.weight"])
            self.blocks.append(_Block(
                norm_attention=norm(block + "ln_1"),
                qkv_weight=tensor(block + "attn.in_proj_weight"),
                qkv_bias=tensor(block + "attn.in_proj_bias"),
                out_weight=tensor(block + "attn.out_proj.weight"),
                out_bias=tensor(block + "attn.out_proj.bias"),
                scale_attention=tensor(block + "ls_1.gamma"),
                norm_mlp=norm(block + "ln_2"),
                fc_weight=self._cast(fc_weight),
                fc_bias=self._cast(fc_bias),
                proj_weight=self._cast(proj_weight),
                proj_bias=tensor(block + "mlp.c_proj.bias"),
                scale_mlp=tensor(block + "ls_2.gamma"),
                activation=activation,
                heads=vision.heads,
            ))

    def _take_hf(self, vision, projection) -> None:
        embeddings = vision.embeddings
        self._take_patches(embeddings.patch_embedding.weight, embeddings.class_embedding, embeddings.position_embedding.weight)
        self.norm_pre = _Norm.of(vision.pre_layrnorm, self.dtype)
        self.norm_post = _Norm.of(vision.post_layernorm, self.dtype)
        self.pool = "tok"
        self.final_norm_after_pool = True  # transformers normalizes the pooled class token
        self.proj = self._cast(projection.weight.t())  # (W, D)
        self.blocks = [self._hf_block(layer) for layer in vision.encoder.layers]

    def _hf_block(self, layer) -> "_Block":
        activation, fc_weight, fc_bias, proj_weight = _fold_quick_gelu_slope(
            mlp_activation(layer.mlp.activation_fn), layer.mlp.fc1.weight, layer.mlp.fc1.bias, layer.mlp.fc2.weight)

        def joined(attention, part):  # q, k, v projections as one (3W, W) matmul, in that order
            tensors = [getattr(getattr(attention, f"{name}_proj"), part) for name in "qkv"]
            return None if any(t is None for t in tensors) else self._cast(torch.cat(tensors))

        return _Block(
            norm_attention=_Norm.of(layer.layer_norm1, self.dtype),
            qkv_weight=joined(layer.self_attn, "weight"),
            qkv_bias=joined(layer.self_attn, "bias"),
            out_weight=self._cast(layer.self_attn.out_proj.weight),
            out_bias=self._cast(layer.self_attn.out_proj.bias),
            scale_attention=None,
            norm_mlp=_Norm.of(layer.layer_norm2, self.dtype),
            fc_weight=self._cast(fc_weight),
            fc_bias=self._cast(fc_bias),
            proj_weight=self._cast(proj_weight),
            proj_bias=self._cast(layer.mlp.fc2.bias),
            scale_mlp=None,
            activation=activation,
            heads=layer.self_attn.num_heads,
        )

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = pixels.shape
        ph, pw = self.patch
        gh, gw = height // ph, width // pw
        # (N, 3, S, S) → (N·G, 3·P·P) patches in the convolution's (c, y, x) order
        patches = pixels[:, :, : gh * ph, : gw * pw].reshape(n, channels, gh, ph, gw, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n * gh * gw, channels * ph * pw)
        tokens = _linear(patches, self.patch_weight, None).reshape(n, gh * gw, self.width)
        return self._encode_tokens(tokens)

    def encode_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 RGB → (N, D) in ``dtype``: the forward on ``(x / 255 − mean) / std``
        with the normalization folded into the patch matmul (call :meth:`fold_normalization` first)."""
        if self.folded_patch_weight is None:
            raise RuntimeError("encode_uint8 needs fold_normalization(mean, std) first")
        n, height, width, channels = images.shape
        ph, pw = self.patch
        gh, gw = height // ph, width // pw
        patches = images[:, : gh * ph, : gw * pw].reshape(n, gh, ph, gw, pw, channels)
        patches = patches.permute(0, 1, 3, 5, 2, 4).reshape(n * gh * gw, channels * ph * pw)  # (c, y, x)
        centered = patches.bitwise_xor(0x80).view(torch.int8)  # x − 128 as two's complement
        tokens = _linear(centered.to(self.dtype), self.folded_patch_weight, self.folded_patch_bias)
        return self._encode_tokens(tokens.reshape(n, gh * gw, self.width))

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, G, W) patch embeddings → (N, D): class token, positions, blocks, pool, projection."""
        n = tokens.shape[0]
        tokens = torch.cat([self.class_embedding.expand(n, 1, -1), tokens], dim=1) + self.positional_embedding
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        length = tokens.shape[1]
        x = tokens.reshape(n * length, self.width)  # (N·L, W) residual stream
        blocks = self.blocks[:-1] if self.class_token_last_block else self.blocks
        for block in blocks:
            x = _run_block(block, x, n, length)
        if self.class_token_last_block:
            x = _run_last_block_class_token(self.blocks[-1], self.last_block_query, x, n, length)
            length = 1  # x is (N, W): the class token's row of each image
        x = x.reshape(n, length, self.width)
        if self.final_norm_after_pool:
            pooled = _pool(x, self.pool)
            pooled = self.norm_post(pooled) if self.norm_post is not None else pooled
        else:
            x = self.norm_post(x) if self.norm_post is not None else x
            pooled = _pool(x, self.pool)
        return pooled @ self.proj if self.proj is not None else pooled


def _check_int8(dtype: torch.dtype, int8: bool) -> None:
    if int8 and dtype != torch.float32:
        raise ValueError(f"the int8 form runs its other layers in float32, not {dtype}")
    if int8 and not int8_linear_available():
        raise ValueError("this torch build has no oneDNN int8 linear (onednn.qlinear_pointwise)")


def _run_block(block: _Block, x: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """One pre-norm residual block on the (N·L, W) stream."""
    width = x.shape[1]
    heads = block.heads
    normed = block.norm_attention(x)
    if block.int8 is not None:
        qkv = block.int8.qkv(normed)
    else:
        qkv = _linear(normed, block.qkv_weight, block.qkv_bias)  # (N·L, 3W)
    q, k, v = qkv.reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 × (N, H, L, Dh)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * length, width)
    return _finish_block(block, x, attended)


def _run_last_block_class_token(block: _Block, query_split, x: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """The block's output on the class token only: (N·L, W) stream → (N, W). Keys and values come from
    every token; the query, the attention's output projection and the MLP run on N rows, not N·L."""
    width = x.shape[1]
    heads = block.heads
    normed = block.norm_attention(x)
    class_rows = normed.reshape(n, length, width)[:, 0].contiguous()  # (N, W)
    if block.int8 is not None:
        key_value, query = block.int8.key_value(normed), block.int8.query(class_rows)
    else:
        query_weight, query_bias, kv_weight, kv_bias = query_split
        key_value, query = _linear(normed, kv_weight, kv_bias), _linear(class_rows, query_weight, query_bias)
    k, v = key_value.reshape(n, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    q = query.reshape(n, 1, heads, width // heads).transpose(1, 2)
    attended = F.scaled_dot_product_attention(q, k, v).reshape(n, width)  # (N, H, 1, Dh) → (N, W)
    return _finish_block(block, x.reshape(n, length, width)[:, 0], attended)


def _finish_block(block: _Block, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Attention output projection and residual, then the MLP and its residual, on (R, W) rows."""
    if block.scale_attention is None:  # the residual added inside the matmul (one pass, one rounding)
        x = _linear_add(attended, block.out_weight, block.out_bias, x)
    else:
        x = x + _linear(attended, block.out_weight, block.out_bias) * block.scale_attention

    int8 = block.int8
    hidden = block.norm_mlp(x)
    if int8 is not None:
        hidden = int8.fc(hidden, block.activation)
    else:
        hidden = _linear(hidden, block.fc_weight, block.fc_bias, block.activation)  # (R, M), activation fused
    if block.scale_mlp is None:
        if int8 is not None:
            return int8.proj.add(hidden, x)
        return _linear_add(hidden, block.proj_weight, block.proj_bias, x)
    down = int8.proj(hidden) if int8 is not None else _linear(hidden, block.proj_weight, block.proj_bias)
    return x + down * block.scale_mlp


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """(R, K) · (O, K)ᵀ + (O,) → (R, O) in one oneDNN call, with ``gelu`` / ``gelu_tanh`` / ``swish`` fused."""
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    if activation == "gelu_tanh":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    if activation == "swish":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fold_quick_gelu_slope(activation: str, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                           proj_weight: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The MLP's weights for the activation the fused forward runs: (activation, fc (M, W), fc bias (M,),
    proj (W, M)). QuickGELU, ``h · σ(1.702 h)``, becomes oneDNN's swish post-op ``z · σ(z)``, which takes no
    slope: with the up projection's weight and bias scaled by 1.702, z = 1.702 h and swish gives
    1.702 · QuickGELU(h), so the down projection's weight carries 1 / 1.702. The activation then costs no pass
    of its own over the (R, M) hidden rows. Scaled in float64 from the source tensors, so each weight is
    rounded to the run's dtype once, as the unscaled ones are; other activations pass through unchanged."""
    if activation != "quick_gelu":
        return activation, fc_weight, fc_bias, proj_weight
    slope = _QUICK_GELU_SLOPE
    return ("swish", fc_weight.detach().double() * slope,
            None if fc_bias is None else fc_bias.detach().double() * slope, proj_weight.detach().double() / slope)


def _linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x · weightᵀ + bias`` (R, O) in one oneDNN call: the sum is the matmul's post-op, added to
    its float32 accumulator (one rounding to the dtype instead of two, no separate pass over the rows)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, L, W) → (N, W): the class token ("tok") or the mean of the patch tokens ("avg")."""
    return x[:, 1:].mean(dim=1) if pool == "avg" else x[:, 0]
