"""Rotary position embedding applied to a vector: the op MLA's training path and the decode kernels share.

DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ...; the rotated output is laid out as
[even parts | odd parts], the same permutation for q and k, so q·k is unchanged. The frequencies
(with YaRN) come from align/models/rope.py.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """x [B, S, ..., D] with cos/sin [B, S, D/2] -> rotated x, same dtype.

    interleaved: pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); otherwise (x_i, x_{i+D/2}).
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    a, b = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
