"""Causal attention over variable-length segments laid end to end: packed documents without a dense mask.

`varlen_attention(q, k, v, cu_seqlens, max_len, scale)` takes the tokens of every segment (a packed
document, or the real tokens of a padded row) flattened to [T, h, d] and the segment starts
`cu_seqlens` [N + 1] (int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T); token t of a segment attends to
tokens 0..t of the same segment. No [S, S] mask is built: on CUDA in 16-bit it is PyTorch's
FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, forward and backward), which
needs equal q/k/v head sizes, a multiple of 8, so MLA's 128-wide values are zero-padded to the
192-wide q·k size (and odd sizes of small configs all to the next multiple of 8) and the padding cut
from the output (exact: the padded columns only ever multiply zeros). Elsewhere
`varlen_attention_reference`: one causal SDPA per segment, the formula the kernel is tested against.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
import torch.nn.functional as F


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q, k [T, h, qk], v [T, h, vd], cu_seqlens [N + 1] -> [T, h, vd], causal within each segment."""
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [h, L, d] each
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)  # [T, h, vd]


@functools.cache
def _flash_varlen():
    """torch's varlen_attn and how it takes causality and scale (the signature changed in 2.11), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params and "scale" in params:
        return varlen_attn, {"window_size": (-1, 0)}, True
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}, "scale" in params
    return None


def flash_varlen_ready(t: torch.Tensor) -> bool:
    """Whether the FlashAttention varlen kernel serves tensors like t (CUDA, 16-bit, in this torch)."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and _flash_varlen() is not None


def _flash(q, k, v, cu_seqlens, max_len: int, scale: float) -> torch.Tensor:
    fn, causal, takes_scale = _flash_varlen()
    v_dim, qk_dim = v.shape[-1], q.shape[-1]
    size = -(-max(qk_dim, v_dim) // 8) * 8  # the kernel's head size: equal for q, k, v, a multiple of 8
    q, k = (F.pad(t, (0, size - qk_dim)) if size > qk_dim else t for t in (q, k))  # zeros add nothing to q·k
    if v_dim < size:
        v = F.pad(v, (0, size - v_dim))  # [T, h, size]
    if takes_scale:
        out = fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **causal)
    else:  # the kernel's own scale is 1/sqrt(size): fold the difference into q
        out = fn(q * (scale * size**0.5), k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal)
    return out[..., :v_dim]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """q, k [T, h, qk], v [T, h, vd], cu_seqlens int32 [N + 1], max_len = longest segment -> [T, h, vd]."""
    if flash_varlen_ready(q):
        return _flash(q, k, v, cu_seqlens, max_len, scale)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale)
