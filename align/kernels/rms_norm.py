"""RMSNorm, and residual add + RMSNorm in one pass for the decode step.

`rms_norm_reference(x, weight, eps)` is the formula the model's RMSNorm (align/models/norm.py)
applies: normalised in float32, rounded to x's dtype, then scaled by the weight in x's dtype.
`add_rms_norm(x, delta, weight, eps)` returns (x + delta, RMSNorm(x + delta)), the sum rounded
to x's dtype. delta=None normalises x alone. On CUDA in 16-bit without autograd one Triton program
per row replaces the half-dozen elementwise launches of the PyTorch form; elsewhere the reference.
`rms_norm(x, weight, eps)` is the model's RMSNorm: on CUDA in 16-bit a Triton forward that keeps the
per-row 1/rms, and a Triton backward (dx per row; dw summed per block of rows, then over the
blocks), where otherwise some fifteen elementwise launches and float32 copies run forward and back.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import kernel_path, left_to_inductor, pow2_block, triton_ready


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> weight * (x / rms(x)), the ratio in float32 rounded to x's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> RMSNorm(x), by the Triton kernels (with backward) where they run."""
    if weight.dtype == x.dtype and triton_ready(x, half=True) and not left_to_inductor():
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [..., H], weight [H] -> (x + delta, normalised x + delta)."""
    if delta is not None:
        x = x + delta
    return x, rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [..., H] (delta may be None), weight [H] -> (x + delta, normalised x + delta)."""
    operands = (x, weight) if delta is None else (x, weight, delta)
    if weight.dtype == x.dtype and kernel_path(*operands, half=True):
        return _add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_reference(x, delta, weight, eps)


def _add_rms_norm_triton(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm_reference, one Triton program per row (inputs made contiguous)."""
    from align.kernels import rms_norm_triton  # Triton only where the kernel runs

    shape, hidden = x.shape, x.shape[-1]
    x = x.reshape(-1, hidden).contiguous()  # [N, H]
    total = torch.empty_like(x) if delta is not None else x
    normed = torch.empty_like(x)
    delta = x if delta is None else delta.reshape(-1, hidden).contiguous()
    rms_norm_triton.add_rms_norm_kernel[(x.shape[0],)](
        x, delta, weight, total, normed, hidden, eps,
        HAS_DELTA=total is not x, BLOCK_H=pow2_block(hidden),
    )
    return total.view(shape), normed.view(shape)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] contiguous -> (y [N, H], rstd [N] float32)."""
    from align.kernels import rms_norm_triton  # Triton only where the kernel runs

    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        rms_norm_triton.rms_norm_forward_kernel[(x.shape[0],)](
            x, weight, y, rstd, x.shape[1], eps, BLOCK_H=pow2_block(x.shape[1])
        )
    return y, rstd


def rms_norm_backward(
    x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, rows_per_program: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, dy [N, H] contiguous, rstd [N] -> (dx [N, H], dw [H] in weight's dtype)."""
    from align.kernels import rms_norm_triton  # Triton only where the kernel runs

    n, hidden = x.shape
    programs = max(1, -(-n // rows_per_program))
    dx = torch.empty_like(x)
    partial = torch.zeros(programs, hidden, dtype=torch.float32, device=x.device)  # [P, H]
    if n:
        rms_norm_triton.rms_norm_backward_kernel[(programs,)](
            x, weight, dy, rstd, dx, partial, n, hidden, ROWS=rows_per_program, BLOCK_H=pow2_block(hidden)
        )
    return dx, partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # [N, H]
        y, rstd = rms_norm_forward(flat, weight, eps)
        ctx.save_for_backward(flat, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        flat, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(flat, weight, rstd, dy.reshape(flat.shape).contiguous())
        return dx.view(dy.shape), dw, None
