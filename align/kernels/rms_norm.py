"""RMSNorm, and residual add + RMSNorm in one pass for the decode step.

`rms_norm_reference(x, weight, eps)` is the formula the model's RMSNorm (align/models/norm.py)
applies: normalised in float32, rounded to x's dtype, then scaled by the weight in x's dtype.
`add_rms_norm(x, delta, weight, eps)` returns (x + delta, RMSNorm(x + delta)), the sum rounded
to x's dtype. delta=None normalises x alone. On CUDA in 16-bit without autograd one Triton program
per row replaces the half-dozen elementwise launches of the PyTorch form; elsewhere the reference.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import kernel_path, pow2_block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> weight * (x / rms(x)), the ratio in float32 rounded to x's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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
