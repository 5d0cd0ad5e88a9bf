"""SwiGLU's Triton kernels, forward and backward, against the PyTorch reference in float64."""

from __future__ import annotations

import pytest
import torch

from align.kernels.swiglu import SwiGLU, swiglu, swiglu_reference
from tests.kernels.conftest import DEVICE, DTYPES


def _inputs(rows: int, inter: int, dtype: torch.dtype, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * inter)
    if fused:  # views of one gate_up product [N, 2I], rows strided by 2I (the routed experts' layout)
        return (torch.randn(rows, 2 * inter, generator=gen) * 3).to(DEVICE, dtype).chunk(2, dim=-1)
    gate, up = (torch.randn(2, rows, 3, inter, generator=gen) * 3).to(DEVICE, dtype)  # [B, S, I] each
    return gate, up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter,fused", [(7, 1408, True), (5, 40, False), (1, 3000, True), (0, 16, True)])
def test_swiglu_forward_and_backward(dtype, rows, inter, fused):
    gate, up = _inputs(rows, inter, dtype, fused)
    leaves = [gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()]
    out = SwiGLU.apply(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad)
    ref_leaves = [gate.detach().cpu().double().requires_grad_(), up.detach().cpu().double().requires_grad_()]
    ref = swiglu_reference(*ref_leaves)
    ref.backward(grad.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol, atol=tol)
    for ours, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad.double().cpu(), want.grad, rtol=tol, atol=tol * 10)


def test_swiglu_dispatch_keeps_the_reference_off_cuda():
    gate, up = torch.randn(2, 4, 8).unbind(0)
    if DEVICE == "cpu":
        assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
