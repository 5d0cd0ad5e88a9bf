"""MLA attention against the latent cache: prefill (decompressed, packed prompts) and decode (absorbed).

Decode, one new token per slot, never decompresses the cache:
    q_latent = q_nope · W_UK                      [B, h, kv_rank]   (W_UK: key half of kv_b_proj)
    scores   = [q_latent | q_pe] · [c | k_pe]ᵀ    [B, h, T]         (one matmul over the cached rows)
    out      = softmax(scores * scale) · c · W_UVᵀ  [B, h, v]       (W_UV: value half of kv_b_proj)
then `o_proj`. W_UK / W_UV come from the live `kv_b_proj` through `effective_weight`, so a LoRA
adapter on it is honoured; every other projection is called as the module it is.
"""

from __future__ import annotations

import functools

import torch

from align.generation.cache import LatentCache
from align.generation.weights import effective_weight
from align.kernels.mla_decode import fused_decode_available, latent_attention, write_latent
from align.models.mla import MLA


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


def prefill_attention(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
    cache: LatentCache, layer: int, slot: torch.Tensor, pos: torch.Tensor, need_output: bool = True,
) -> torch.Tensor | None:
    """x [1, S, H] packed prompt tokens (after input_layernorm) -> attention output [1, S, H].

    Writes each token's latent to (slot[i], pos[i]) of the cache (slot/pos [S]). need_output=False
    (the last layer: its output feeds nothing the cache needs) only writes the cache.
    """
    c, k_pe = attn.latent(x, cos, sin)  # [1, S, rank], [1, S, rope]
    cache.write(layer, slot, pos, c[0], k_pe[0])
    if not need_output:
        return None
    q_nope, q_pe = attn.query(x, cos, sin)
    return attn.attend_latents(q_nope, q_pe, c, k_pe, mask)


def decode_attention(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    cache: LatentCache, layer: int, positions: torch.Tensor, attend_len: int,
) -> torch.Tensor:
    """x [B, 1, H] one token per slot (after input_layernorm) -> [B, 1, H].

    Slot b's token is written at positions[b] and attends to cache positions [0, positions[b]];
    attend_len (static, >= every live position + 1) bounds the cache rows read.
    """
    if fused_decode_available(x):
        return _decode_attention_fused(attn, x, cos, sin, cache.layer(layer), positions)
    batch = x.shape[0]
    q_nope, q_pe = attn.query(x, cos, sin)  # [B, 1, h, nope], [B, 1, h, rope]
    c, k_pe = attn.latent(x, cos, sin)  # [B, 1, rank], [B, 1, rope]
    slots = torch.arange(batch, device=x.device)
    cache.write(layer, slots, positions, c[:, 0], k_pe[:, 0])

    w_uk, w_uv = attn.absorbed_weights(effective_weight(attn.kv_b_proj))  # [h, nope, rank], [h, v, rank]
    q_latent = torch.einsum("bhn,hnr->bhr", q_nope[:, 0], w_uk)  # [B, h, rank]
    q = torch.cat([q_latent, q_pe[:, 0]], dim=-1)  # [B, h, rank + rope]
    rows = cache.layer(layer)[:, :attend_len]  # [B, T, rank + rope]
    scores = latent_scores(q, rows) * attn.scale  # [B, h, T] float32
    visible = torch.arange(attend_len, device=x.device)[None] <= positions[:, None]  # [B, T]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1).to(rows.dtype)
    out_latent = torch.bmm(probs, rows[..., : attn.kv_rank])  # [B, h, rank]
    out = torch.einsum("bhr,hvr->bhv", out_latent, w_uv)  # [B, h, v]
    return attn.o_proj(out.reshape(batch, 1, attn.n_heads * attn.v_dim))  # [B, 1, h*v] -> [B, 1, H]


def _decode_attention_fused(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """decode_attention through the Triton kernels (CUDA, 16-bit): the same computation, ~8 launches."""
    batch, heads = x.shape[0], attn.n_heads
    cos, sin = cos[:, 0], sin[:, 0]  # [B, rope/2]
    norm = attn.kv_a_layernorm
    kv = attn.kv_a_proj_with_mqa(x)[:, 0]  # [B, rank + rope]
    write_latent(kv, norm.weight, norm.eps, cos, sin, rows, positions, attn.interleaved)
    q = attn.query_states(x)[:, 0]  # [B, h, nope + rope]
    w_uk, w_uv = attn.absorbed_weights(effective_weight(attn.kv_b_proj))  # [h, nope, rank], [h, v, rank]
    q_latent = torch.bmm(q[..., : attn.nope_dim].transpose(0, 1), w_uk)  # [h, B, rank]
    out_latent = torch.empty_like(q_latent)  # [h, B, rank], written through a [B, h, rank] view
    latent_attention(
        q_latent.transpose(0, 1), q[..., attn.nope_dim :], cos, sin, rows, positions, attn.scale,
        attn.interleaved, out=out_latent.transpose(0, 1),
    )
    out = torch.bmm(out_latent, w_uv.transpose(1, 2))  # [h, B, v]
    return attn.o_proj(out.transpose(0, 1).reshape(batch, 1, heads * attn.v_dim))  # [B, 1, h*v] -> [B, 1, H]
