"""Rotary position embedding applied to a vector: the op MLA's training path and the decode kernels share.

DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ...; the rotated output is laid out as
[even parts | odd parts], the same permutation for q and k, so q·k is unchanged. The frequencies
(with YaRN) come from align/models/rope.py.

`apply_rope(x, cos, sin)` on training / prefill shapes (x [B, S, h, D] or [B, S, D], cos/sin
[B, S, D/2]) runs, on CUDA in 16-bit, one Triton program per token for all its heads, forward and
backward (the transposed rotation), in float32 with one rounding, as `apply_rope_reference` does in
PyTorch's half-dozen launches; other shapes and devices take the reference.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import left_to_inductor, pow2_block, triton_ready


def apply_rope_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """x [B, S, ..., D] with cos/sin [B, S, D/2] -> rotated x, same dtype.

    interleaved: pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); otherwise (x_i, x_{i+D/2}).
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    a, b = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def _kernel_shapes(x: torch.Tensor, cos: torch.Tensor) -> bool:
    return x.dim() in (3, 4) and cos.shape == (*x.shape[:2], x.shape[-1] // 2) and x.shape[-1] % 2 == 0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """As apply_rope_reference; by the Triton kernels (with backward) where they run."""
    if _kernel_shapes(x, cos) and sin.shape == cos.shape and triton_ready(x, half=True) and not left_to_inductor():
        return RoPE.apply(x, cos, sin, interleaved)
    return apply_rope_reference(x, cos, sin, interleaved)


def _tokens_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, S, h, D] or [B, S, D] -> a [B*S, h, D] view (h = 1) with a unit last stride, copied if need be."""
    heads = t.shape[2] if t.dim() == 4 else 1
    flat = t.reshape(-1, heads, t.shape[-1])  # [T, h, D]
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _launch(kernel, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    s = _tokens_heads(src)  # [T, h, D]
    dest = torch.empty(s.shape, dtype=src.dtype, device=src.device)
    cos, sin = (c.reshape(-1, c.shape[-1]).contiguous() for c in (cos, sin))  # [T, D/2]
    if s.shape[0]:
        kernel[(s.shape[0],)](
            s, cos, sin, dest, s.stride(0), s.stride(1), dest.stride(0), dest.stride(1), s.shape[1], s.shape[2] // 2,
            INTERLEAVED=interleaved, BLOCK_HEADS=pow2_block(s.shape[1], 2), BLOCK_HALF=pow2_block(s.shape[2] // 2),
        )
    return dest.view(src.shape)


class RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        from align.kernels import rope_triton  # Triton only where the kernels run

        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _launch(rope_triton.rope_forward_kernel, x, cos, sin, interleaved)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from align.kernels import rope_triton  # Triton only where the kernels run

        cos, sin = ctx.saved_tensors
        return _launch(rope_triton.rope_backward_kernel, grad, cos, sin, ctx.interleaved), None, None, None
