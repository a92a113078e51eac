"""Small open_clip ViT variants the fused CPU forward and the class-token tower are tested on."""

import torch


def vision(**overrides):
    """A random-init open_clip VisionTransformer (32², patch 8, width 64, 2 layers) with ``overrides``,
    its norms, biases and LayerScales perturbed away from their init."""
    from open_clip.transformer import VisionTransformer

    settings = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=24)
    settings.update(overrides)
    torch.manual_seed(0)
    visual = VisionTransformer(**settings).eval().requires_grad_(False)
    # random-init open_clip leaves norms at identity and LayerScale at 1e-5: perturb them so a
    # forward that skipped or misplaced one would differ
    with torch.no_grad():
        for name, parameter in visual.named_parameters():
            if "ln" in name or "gamma" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    return visual


def variants():
    """name → VisionTransformer overrides: every variant the fused and class-token forwards cover."""
    from open_clip.transformer import LayerNormFp32, QuickGELU

    return {
        "plain": {},
        "layer-scale": {"ls_init_value": 0.5},
        "avg-pool": {"pool_type": "avg"},
        "no-ln-pre": {"no_ln_pre": True},
        "ln-after-pool": {"pool_type": "avg", "final_ln_after_pool": True},
        "class-token-ln-after-pool": {"final_ln_after_pool": True},
        "one-block": {"layers": 1},  # its only block is the last: the class-token-only one
        "quick-gelu": {"act_layer": QuickGELU},
        "gelu-tanh": {"act_layer": lambda: torch.nn.GELU(approximate="tanh")},
        "layer-norm-fp32": {"norm_layer": LayerNormFp32},
        "size-not-a-patch-multiple": {"image_size": 36},  # 36 = 4·8 + 4: the convolution drops the rest
    }
