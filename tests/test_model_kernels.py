"""The model's rewritten ops against the plain torch forms they replace (same function, other kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mps_cli.engine.model import patch_embedding


@pytest.mark.parametrize(("size", "patch"), [(224, 14), (224, 32), (230, 14)])  # 230: a remainder the conv drops
def test_patch_embedding_is_the_convolution_forward_and_backward(size, patch):
    gen = torch.Generator().manual_seed(size + patch)
    conv = nn.Conv2d(3, 48, kernel_size=patch, stride=patch, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    pixels = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    want = conv(pixels).flatten(2).transpose(1, 2)
    got = patch_embedding(pixels, conv)
    assert got.shape == want.shape == (2, (size // patch) ** 2, 48)
    assert torch.allclose(got, want, atol=1e-12)
    grad = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, pixels, grad)
    (got_grad,) = torch.autograd.grad(got, pixels, grad)
    assert torch.allclose(got_grad, want_grad, atol=1e-12)
    # The pixels the convolution never reads get no gradient either way.
    unread = got_grad[..., size // patch * patch:]
    assert unread.numel() == 0 or unread.abs().max() == 0


def test_the_backward_has_no_convolution_in_it():
    """What the reward's pixel gradient runs through: matmuls, no cuDNN-bound convolution_backward."""
    from torch.profiler import ProfilerActivity, profile

    conv = nn.Conv2d(3, 64, kernel_size=14, stride=14, bias=False).requires_grad_(False)
    pixels = torch.rand(2, 3, 224, 224, requires_grad=True)
    out = patch_embedding(pixels, conv).square().sum()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::convolution_backward" not in ops and "aten::mm" in ops
