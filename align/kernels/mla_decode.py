"""MLA decode (one new token per cache slot) against the latent cache, inference only.

Two ops, each a Triton kernel on CUDA in 16-bit without autograd and its PyTorch reference elsewhere:
- `write_latent`: RMS-normalise the latent c (the `kv_a_layernorm` weight and eps), rotate the
  shared key k_pe, store [c | k_pe] at (slot b, positions[b]) of one cache layer.
- `latent_attention`: for each slot, scores [q_latent | rope(q_pe)] · [c | k_pe]ᵀ over its cached
  rows 0..positions[b], softmax (float32), and the weighted sum of the c rows. The kernel never reads
  rows past a slot's position, so a bucketed attention length costs nothing; about forty small ops
  per layer of the PyTorch form become two launches.

The rotary layout is align/kernels/rope.py's: interleaved pairs (x0, x1), ... or halves,
the rotated output laid out as [first parts | second parts]. No backward: decode runs under no_grad.
Triton is imported lazily: on CPU the decode step uses the references and never touches it.
"""

from __future__ import annotations

import functools

import torch

from align.kernels.dispatch import kernel_path, pow2_block, require_contiguous_last_dim
from align.kernels.rms_norm import rms_norm_reference
from align.kernels.rope import apply_rope_reference


def write_latent(
    kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, positions: torch.Tensor, interleaved: bool,
) -> None:
    """kv [B, R+P] (kv_a_proj output), cos/sin [B, P/2] float32, rows [slots, T, R+P] one cache layer."""
    if norm_weight.dtype == kv.dtype and kernel_path(kv, norm_weight, half=True):
        _write_latent_triton(kv, norm_weight, eps, cos, sin, rows, positions, interleaved)
    else:
        write_latent_reference(kv, norm_weight, eps, cos, sin, rows, positions, interleaved)


def latent_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor, scale: float, interleaved: bool, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q_latent [B, h, R], q_pe [B, h, P] (not yet rotated), rows [slots >= B, T, R+P] -> [B, h, R].

    Slot b attends to its rows 0..positions[b] (< T). `out` [B, h, R], any strides, receives the result.
    """
    if rows.dtype == q_latent.dtype and kernel_path(q_latent, q_pe, rows, half=True):
        return _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, scale, interleaved, out)
    result = latent_attention_reference(q_latent, q_pe, cos, sin, rows, positions, scale, interleaved)
    return result if out is None else out.copy_(result)


# ----------------------------------------------------------------------------- references
def write_latent_reference(
    kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, positions: torch.Tensor, interleaved: bool,
) -> None:
    """As write_latent, in PyTorch."""
    rank = norm_weight.shape[0]
    c, k_pe = kv.split([rank, kv.shape[1] - rank], dim=-1)
    c = rms_norm_reference(c, norm_weight, eps)  # [B, R]
    k_pe = apply_rope_reference(k_pe, cos, sin, interleaved)  # [B, P]
    slots = torch.arange(kv.shape[0], device=kv.device)
    rows.index_put_((slots, positions), torch.cat([c, k_pe], dim=-1).to(rows.dtype))


@functools.cache
def _bmm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.zeros(1, 2, 8, dtype=dtype, device=device)
        torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def latent_scores(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [B, h, D] · rows [B, T, D]ᵀ -> [B, h, T] in float32.

    Low-precision inputs keep float32 scores (as flash kernels do): on CUDA through bmm's float32
    output (no upcast copy of the cache), elsewhere by upcasting. Rounding scores to bf16 instead
    (DeepSeek's reference does) doubled the log-prob error against a full forward in a bf16 check.
    """
    if q.dtype == torch.float32:
        return torch.bmm(q, rows.transpose(1, 2))
    if q.is_cuda and _bmm_out_dtype_works(q.device, q.dtype):
        return torch.bmm(q, rows.transpose(1, 2), out_dtype=torch.float32)
    if q.is_cuda:
        return torch.bmm(q, rows.transpose(1, 2)).float()
    return torch.bmm(q.float(), rows.transpose(1, 2).float())


def latent_attention_reference(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor, scale: float, interleaved: bool,
) -> torch.Tensor:
    """As latent_attention: scores in float32, probabilities rounded to the cache dtype before the
    value product (as the kernel's tensor-core product does), the product in the cache dtype."""
    batch, rank = q_latent.shape[0], q_latent.shape[2]
    q_pe = apply_rope_reference(q_pe, cos[:, None], sin[:, None], interleaved)
    q = torch.cat([q_latent, q_pe], dim=-1)  # [B, h, R+P]
    rows = rows[:batch]
    scores = latent_scores(q, rows) * scale  # [B, h, T]
    visible = torch.arange(rows.shape[1], device=rows.device)[None] <= positions[:, None]  # [B, T]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1).to(rows.dtype)
    return torch.bmm(probs, rows[..., :rank])  # [B, h, R]


# ----------------------------------------------------------------------------- launchers
def _write_latent_triton(
    kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, positions: torch.Tensor, interleaved: bool,
) -> None:
    """As write_latent_reference, one program per slot."""
    from align.kernels import mla_decode_triton  # Triton only where the kernels run

    require_contiguous_last_dim("write_latent", kv=kv, cos=cos, sin=sin, rows=rows)
    rank, half = norm_weight.shape[0], (kv.shape[1] - norm_weight.shape[0]) // 2
    mla_decode_triton.write_latent_kernel[(kv.shape[0],)](
        kv, kv.stride(0), norm_weight, cos, sin, cos.stride(0), rows, rows.stride(0), rows.stride(1),
        positions, eps, R=rank, P2=half, BLOCK_R=pow2_block(rank), BLOCK_P2=pow2_block(half),
        INTERLEAVED=interleaved,
    )


def _latent_attention_triton(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor, scale: float, interleaved: bool, out: torch.Tensor | None = None,
    block_t: int = 64, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """As latent_attention, one program per slot (all heads); the tile knobs are for
    bench/tune_decode_kernels.py (defaults: fastest at V2-Lite shape on an H100)."""
    from align.kernels import mla_decode_triton  # Triton only where the kernels run

    batch, heads, rank = q_latent.shape
    half = q_pe.shape[2] // 2
    if out is None:
        out = torch.empty_like(q_latent)
    require_contiguous_last_dim("latent_attention", q_latent=q_latent, q_pe=q_pe, cos=cos, sin=sin, rows=rows, out=out)
    mla_decode_triton.latent_attention_kernel[(batch,)](
        q_latent, q_latent.stride(0), q_latent.stride(1), q_pe, q_pe.stride(0), q_pe.stride(1),
        cos, sin, cos.stride(0), rows, rows.stride(0), rows.stride(1), positions,
        out, out.stride(0), out.stride(1), scale, heads, R=rank, P2=half, BLOCK_H=pow2_block(heads),
        BLOCK_R=pow2_block(rank), BLOCK_P2=pow2_block(half), BLOCK_T=block_t, INTERLEAVED=interleaved,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
