"""The class-token-only last block against the tower's own forward."""

import pytest
import torch

from clipengine.bindings.class_token import ClassTokenVisionTower, unprunable_reason

from tests.bindings.vit_variants import variants, vision


@pytest.mark.parametrize("variant", ["plain", "layer-scale", "no-ln-pre", "class-token-ln-after-pool", "quick-gelu",
                                     "one-block", "size-not-a-patch-multiple"])
def test_matches_the_towers_forward(variant):
    visual = vision(**variants()[variant])
    assert unprunable_reason(visual) is None
    size = visual.image_size[0]
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(ClassTokenVisionTower(visual)(pixels), visual(pixels), rtol=1e-5, atol=1e-5)


def test_without_projection():
    visual = vision()
    visual.proj = None
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ClassTokenVisionTower(visual)(pixels), visual(pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, reason",
    [({"pool_type": "avg"}, "pool type 'avg'"), ({"attentional_pool": True}, "attentional pooling")],
)
def test_names_what_it_cannot_prune(change, reason):
    visual = vision(**change)
    assert reason in unprunable_reason(visual)
    with pytest.raises(ValueError, match="class token only"):
        ClassTokenVisionTower(visual)
