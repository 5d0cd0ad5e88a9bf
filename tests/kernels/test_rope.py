"""RoPE's Triton kernels, forward and backward, against the PyTorch reference in float64."""

from __future__ import annotations

import pytest
import torch

from align.kernels.rope import RoPE, apply_rope_reference
from tests.kernels.conftest import DEVICE, DTYPES


def _angles(batch: int, seq: int, half: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(batch, seq, half, generator=gen) * 6.28
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape,sliced", [((2, 5, 16, 64), True), ((2, 5, 64), False), ((1, 3, 3, 6), True)])
def test_rope_forward_and_backward(dtype, interleaved, shape, sliced):
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    if sliced:  # the rope part of a query [.., nope + rope]: rows strided wider than D
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., shape[-1]:]
    else:
        x = torch.randn(*shape, generator=gen)
    cos, sin = _angles(shape[0], shape[1], shape[-1] // 2, gen)
    grad = torch.randn(shape, generator=gen)
    leaf = x.to(DEVICE, dtype).detach().requires_grad_()
    out = RoPE.apply(leaf, cos.to(DEVICE), sin.to(DEVICE), interleaved)
    out.backward(grad.to(DEVICE, dtype))
    ref_leaf = x.to(dtype).double().detach().requires_grad_()
    ref = apply_rope_reference(ref_leaf, cos.double(), sin.double(), interleaved)
    ref.backward(grad.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, rtol=tol, atol=tol)
