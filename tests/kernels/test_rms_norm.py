"""Fused residual add + RMSNorm against its PyTorch reference and the model's RMSNorm."""

from __future__ import annotations

import pytest
import torch

from align.kernels.rms_norm import RMSNormFunction, _add_rms_norm_triton, add_rms_norm_reference, rms_norm_reference
from align.models.norm import RMSNorm
from tests.kernels.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 1, 2048), (3, 40), (2, 5, 100)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_reference(dtype, shape, with_delta):
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    delta = torch.randn(*shape, generator=gen).to(DEVICE, dtype) if with_delta else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    total, normed = _add_rms_norm_triton(x, delta, weight, 1e-6)
    ref_total, ref_normed = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert total.shape == normed.shape == x.shape and normed.dtype == dtype
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, ref_normed, rtol=tol, atol=tol)
    norm = RMSNorm(shape[-1], eps=1e-6).to(DEVICE, dtype)
    norm.weight.data.copy_(weight)
    torch.testing.assert_close(add_rms_norm_reference(x, None, weight, 1e-6)[1], norm(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 2048), (130, 40), (1, 512), (0, 16)])
def test_rms_norm_forward_and_backward(dtype, shape):
    """The training kernels (forward keeps 1/rms; backward dx and dw) against the reference in float64."""
    gen = torch.Generator().manual_seed(shape[-1] + 7)
    x = (3 * torch.randn(*shape, generator=gen)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype)
    dy = torch.randn(*shape, generator=gen).to(dtype)
    leaves = [x.to(DEVICE).clone().requires_grad_(), weight.to(DEVICE).clone().requires_grad_()]
    y = RMSNormFunction.apply(*leaves, 1e-6)
    y.backward(dy.to(DEVICE))
    ref_leaves = [x.double().requires_grad_(), weight.double().requires_grad_()]
    ref = rms_norm_reference(*ref_leaves, 1e-6)
    ref.backward(dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=tol, atol=tol)
    for ours, want in zip(leaves, ref_leaves, strict=True):
        scale = max(1.0, float(want.grad.abs().max())) if want.grad.numel() else 1.0
        torch.testing.assert_close(ours.grad.double().cpu() / scale, want.grad / scale, rtol=tol, atol=tol)
