"""Causal attention over whole rows ([B, h, S, d], no mask): cuDNN's fused kernel on Hopper, MLA's head sizes as
they are.

`causal_attention(q, k, v, scale)` takes q, k [B, h, S, qk] and v [B, h, S, vd] and returns [B, h, S, vd], token t
of a row attending to tokens 0..t of the same row. On Hopper or newer in 16-bit it is aten's
`_scaled_dot_product_cudnn_attention` (forward and backward, traced by torch.compile), which takes the 192-wide
q·k and 128-wide v of MLA without padding v: measured on an H200 (bench/bench_attention.py), forward + backward
at 4,096 / 32,768 tokens, 1.3x / 1.6x the rate of SDPA's own choice on v padded to 192 (align's path before),
2.0x / 2.1x that of SDPA's FlashAttention-2.
ALIGN_ATTENTION=flash turns it off (to measure). Elsewhere on CUDA: SDPA with v zero-padded to the q·k size, so
PyTorch's flash kernel (which needs equal head sizes) runs instead of the math path (measured at V2-Lite shape on
an H100, the math path, baddbmm + softmax, took about a quarter of a LoRA training step). On the CPU
`causal_attention_reference`: SDPA, is_causal.
Packed rows (several documents in a row) take align.kernels.varlen_attention instead: cuDNN's ragged
variant in aten gave wrong gradients across segments and faulted at 32k tokens (torch 2.11, cuDNN 9.19).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from align.kernels.dispatch import needs_autograd

_KERNEL = os.environ.get("ALIGN_ATTENTION", "auto")  # or "flash": SDPA's own choice on v padded
# constants, not calls, so torch.compile does not break its graph on them
_CUDNN_OP = bool(torch._C._has_cudnn) and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B, h, S, qk], v [B, h, S, vd] -> [B, h, S, vd]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def cudnn_causal_ready(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN's kernel serves these: CUDA Hopper or newer, 16-bit, as many keys as queries, head
    sizes at most 256 and multiples of 8, the op in this torch, deterministic algorithms off. Every check is
    a constant or one dynamo folds, so a compiled layer keeps one graph."""
    if _KERNEL == "flash" or torch.are_deterministic_algorithms_enabled():
        return False  # cuDNN's backward is not deterministic (train.deterministic): SDPA decides, as before
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-2] != k.shape[-2] or max(q.shape[-1], v.shape[-1]) > 256 or (q.shape[-1] | v.shape[-1]) % 8:
        return False
    return _CUDNN_OP and torch.cuda.get_device_capability(q.device)[0] >= 9


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B, h, S, qk], v [B, h, S, vd] -> [B, h, S, vd], causal within each row."""
    if cudnn_causal_ready(q, k, v):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, needs_autograd(q, k, v), 0.0, True, False, scale=scale
        )[0]
    v_dim = v.shape[-1]
    if q.is_cuda and v_dim < q.shape[-1]:
        padded = F.pad(v, (0, q.shape[-1] - v_dim))  # [B, h, S, qk]
        return causal_attention_reference(q, k, padded, scale)[..., :v_dim]
    return causal_attention_reference(q, k, v, scale)
