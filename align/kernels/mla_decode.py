"""Fused MLA decode (one new token per cache slot) against the latent cache, inference only.

Two kernels replace about forty small ops per layer of the decode step:
- `write_latent`: RMS-normalise the latent c (the `kv_a_layernorm` weight and eps), rotate the
  shared key k_pe, store [c | k_pe] at (slot b, positions[b]) of one cache layer.
- `latent_attention`: for each slot, scores [q_latent | rope(q_pe)] · [c | k_pe]ᵀ over its cached
  rows 0..positions[b], softmax (float32, online), and the weighted sum of the c rows. Rows past a
  slot's position are never read, so a bucketed attention length costs nothing.

The rotary layout is align/kernels/rope.py's: interleaved pairs (x0, x1), ... or halves,
the rotated output laid out as [first parts | second parts]. `*_reference` are the PyTorch
computations each kernel is tested against. No backward: decode runs under no_grad.
Triton is imported lazily: on CPU the decode step uses the references and never touches it.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import pow2_block, require_contiguous_last_dim, triton_ready
from align.kernels.rms_norm import rms_norm_reference
from align.kernels.rope import apply_rope


# ----------------------------------------------------------------------------- references
def write_latent_reference(
    kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, positions: torch.Tensor, interleaved: bool,
) -> None:
    """kv [B, R+P] (kv_a_proj output), cos/sin [B, P/2] float32, rows [slots, T, R+P] one cache layer."""
    rank = norm_weight.shape[0]
    c, k_pe = kv.split([rank, kv.shape[1] - rank], dim=-1)
    c = rms_norm_reference(c, norm_weight, eps)  # [B, R]
    k_pe = apply_rope(k_pe, cos, sin, interleaved)  # [B, P]
    slots = torch.arange(kv.shape[0], device=kv.device)
    rows.index_put_((slots, positions), torch.cat([c, k_pe], dim=-1).to(rows.dtype))


def latent_attention_reference(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor, scale: float, interleaved: bool,
) -> torch.Tensor:
    """q_latent [B, h, R], q_pe [B, h, P] (not yet rotated), rows [slots >= B, T, R+P] -> [B, h, R].

    Scores in float32, probabilities rounded to the cache dtype before the value product (as the
    kernel's tensor-core product does).
    """
    batch, rank = q_latent.shape[0], q_latent.shape[2]
    q = torch.cat([q_latent, apply_rope(q_pe, cos[:, None], sin[:, None], interleaved)], dim=-1)  # [B, h, R+P]
    rows = rows[:batch]
    scores = torch.bmm(q.float(), rows.float().transpose(1, 2)) * scale  # [B, h, T]
    visible = torch.arange(rows.shape[1], device=rows.device)[None] <= positions[:, None]  # [B, T]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1).to(rows.dtype)
    return torch.bmm(probs.float(), rows[..., :rank].float()).to(q_latent.dtype)  # [B, h, R]


# ----------------------------------------------------------------------------- launchers
def write_latent(
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


def latent_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
    positions: torch.Tensor, scale: float, interleaved: bool, out: torch.Tensor | None = None,
    block_t: int = 64,
) -> torch.Tensor:
    """As latent_attention_reference, one program per slot (all heads); `out` [B, h, R] any strides."""
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
        num_warps=4, num_stages=3,  # bench/tune_decode_kernels.py: fastest at V2-Lite shape on an H100
    )
    return out


def fused_decode_available(x: torch.Tensor) -> bool:
    """Whether the Triton decode kernels run for activations like x (CUDA, 16-bit, no autograd)."""
    return not torch.is_grad_enabled() and triton_ready(x, half=True)
