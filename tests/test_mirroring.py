"""Test-time mirroring (common/metrics.py `mirrored_logits`): the softmax averaged over an
image and its mirror images along every subset of spatial axes, each flipped back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.metrics import batched_logits, mirrored_logits


def _conv(dims: int, kernel: int) -> nn.Module:
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 3, kernel, padding=kernel // 2)
    return conv.eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_voxelwise_model_predicts_the_same_with_and_without_mirroring(dims):
    """Each pass is flipped back onto the input's voxels: a 1x1 model (no neighbourhood)
    gives exactly its single-pass probabilities."""
    torch.manual_seed(0)
    model = _conv(dims, 1)
    x = torch.randn((2, 1) + (6, 5, 4)[:dims])
    with torch.no_grad():
        plain = model(x).softmax(1)
        mirrored = mirrored_logits(model, x).softmax(1)
    assert torch.allclose(mirrored, plain, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_mirrored_prediction_of_a_lopsided_model_is_mirror_symmetric(dims):
    """A model that looks one way (a random 3x3(x3) kernel) predicts differently for a
    mirrored scan; averaged over all 2^dims flips, flipping the scan flips the prediction."""
    torch.manual_seed(1)
    model = _conv(dims, 3)
    x = torch.randn((2, 1) + (7, 6, 5)[:dims])
    with torch.no_grad():
        for axis in range(2, 2 + dims):
            plain = model(x.flip(axis)).softmax(1).flip(axis)
            assert not torch.allclose(plain, model(x).softmax(1), atol=1e-3)
            mirrored = mirrored_logits(model, x.flip(axis)).softmax(1).flip(axis)
            assert torch.allclose(mirrored, mirrored_logits(model, x).softmax(1), atol=1e-5)
        both = list(range(2, 2 + dims))
        flipped = mirrored_logits(model, x.flip(both)).softmax(1).flip(both)
        assert torch.allclose(flipped, mirrored_logits(model, x).softmax(1), atol=1e-5)


def test_mirrored_logits_stay_finite_where_a_probability_underflows():
    model = _conv(2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 500.0, -500.0]))
        out = mirrored_logits(model, torch.zeros(1, 1, 4, 4))
    assert torch.isfinite(out).all() and (out.argmax(1) == 1).all()
    loss = nn.functional.cross_entropy(out, torch.full((1, 4, 4), 2))
    assert torch.isfinite(loss)


def test_the_batched_loop_mirrors_each_chunk_when_asked():
    torch.manual_seed(2)
    model = _conv(3, 3)
    x = torch.randn(5, 1, 6, 6, 6)
    with torch.no_grad():
        chunks = torch.cat([logits for _, logits in batched_logits(model, x, 2, flips=True)])
        assert torch.allclose(chunks, mirrored_logits(model, x), atol=1e-5)
        plain = torch.cat([logits for _, logits in batched_logits(model, x, 2)])
        assert torch.allclose(plain, model(x), atol=1e-6)
