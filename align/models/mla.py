"""Multi-head Latent Attention (DeepSeek-V2 §2.1): one module, two paths over the same weights.

Per token: query (optionally through a low-rank q_a/q_b pair), a compressed KV latent c of rank
`kv_lora_rank` plus one shared rotary key k_pe of `qk_rope_head_dim`.

`forward` (training, prefill): keys and values are decompressed from c through `kv_b_proj`, then
attention over packed sequences.

`decode` (one new token per cache slot) never decompresses the latent cache:
    q_latent = q_nope · W_UK                        [B, h, kv_rank]   (W_UK: key half of kv_b_proj)
    scores   = [q_latent | q_pe] · [c | k_pe]ᵀ      [B, h, T]         (one product over the cached rows)
    out      = softmax(scores * scale) · c · W_UVᵀ  [B, h, v]         (W_UV: value half of kv_b_proj)
then `o_proj`. W_UK / W_UV come from the live `kv_b_proj` through `effective_weight`, so a LoRA
adapter on it is honoured; every other projection is called as the module it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from align.kernels.causal_attention import causal_attention
from align.kernels.mla_decode import latent_attention, write_latent
from align.kernels.rope import apply_rope
from align.kernels.varlen_attention import varlen_attention
from align.models.adapters import effective_weight
from align.models.layout import Segments
from align.models.norm import RMSNorm
from align.models.rope import softmax_scale


class MLA(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.q_rank = config.q_lora_rank
        self.interleaved = getattr(config, "rope_interleave", True) is not False
        self.scale = softmax_scale(config)
        hidden, qk_dim, bias = config.hidden_size, self.nope_dim + self.rope_dim, config.attention_bias
        if self.q_rank is None:
            self.q_proj = nn.Linear(hidden, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_rank)
            self.q_b_proj = nn.Linear(self.q_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, hidden, bias=bias)

    def query_states(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> q [B, S, h, nope + rope], its rope part not yet rotated."""
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, self.nope_dim + self.rope_dim)  # [B, S, h, qk]

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> q_nope [B, S, h, nope], q_pe [B, S, h, rope] (rotated)."""
        q_nope, q_pe = self.query_states(x).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleaved)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> normalised latent c [B, S, kv_rank], rotated shared key k_pe [B, S, rope]."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin, self.interleaved)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache=None
    ) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; mask as from attention_mask_for (None = causal).

        cache: a transformers Cache (for GenerationMixin.generate); it holds the latents c and k_pe
        as single-head [B, 1, T, d] tensors, as transformers' own DeepSeek-V2 does.
        """
        q_nope, q_pe = self.query(x, cos, sin)
        c, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            c, k_pe = (t[:, 0] for t in cache.update(c[:, None], k_pe[:, None], self.layer_idx))  # [B, T, d]
        return self.attend_latents(q_nope, q_pe, c, k_pe, mask)

    def attend_latents(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
        mask: torch.Tensor | Segments | None,
    ) -> torch.Tensor:
        """Decompressed attention from query parts and latents (as from `query` / `latent`) -> [B, S, H].

        mask: as from align.models.layout.attention_layout (None = causal, a dense mask, or Segments)."""
        batch, keys = c.shape[:2]
        kv = self.kv_b_proj(c).view(batch, keys, self.n_heads, self.nope_dim + self.v_dim)  # [B, T, h, nope+v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, h, qk]
        k_pe = k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)  # [B, T, h, rope]
        k = torch.cat([k_nope, k_pe], dim=-1)  # [B, T, h, qk]
        if isinstance(mask, Segments):
            out = segment_attention(q, k, v, mask, self.scale)  # [B, S, h, v]
        else:
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # [B, h, S, v]
            out = out.transpose(1, 2)  # [B, S, h, v]
        return self.o_proj(out.reshape(batch, q_nope.shape[1], self.n_heads * self.v_dim))

    def write_latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> None:
        """Hand x's latents [B, 1, S, d] to `cache.update` (as `forward` does) without attending."""
        c, k_pe = self.latent(x, cos, sin)
        cache.update(c[:, None], k_pe[:, None], self.layer_idx)

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
        attend_len: int,
    ) -> torch.Tensor:
        """One token per cache slot, absorbed form: x [B, 1, H], cos/sin [B, 1, rope/2] -> [B, 1, H].

        rows [slots >= B, max_len, kv_rank + rope]: this layer's latent cache. Slot b's latent is
        written at positions[b], then its query attends to rows [0, positions[b]]; attend_len (static,
        above every live position) bounds the rows read. No host reads: CUDA-graph capturable.
        """
        batch, heads = x.shape[0], self.n_heads
        cos, sin = cos[:, 0], sin[:, 0]  # [B, rope/2]
        norm = self.kv_a_layernorm
        kv = self.kv_a_proj_with_mqa(x)[:, 0]  # [B, rank + rope]
        write_latent(kv, norm.weight, norm.eps, cos, sin, rows, positions, self.interleaved)
        q = self.query_states(x)[:, 0]  # [B, h, nope + rope]
        w_uk, w_uv = self.absorbed_weights(effective_weight(self.kv_b_proj))  # [h, nope, rank], [h, v, rank]
        q_latent = torch.bmm(q[..., : self.nope_dim].transpose(0, 1), w_uk)  # [h, B, rank]
        out_latent = torch.empty_like(q_latent)  # [h, B, rank], written through a [B, h, rank] view
        latent_attention(
            q_latent.transpose(0, 1), q[..., self.nope_dim :], cos, sin, rows[:, :attend_len], positions,
            self.scale, self.interleaved, out=out_latent.transpose(0, 1),
        )
        out = torch.bmm(out_latent, w_uv.transpose(1, 2))  # [h, B, v]
        return self.o_proj(out.transpose(0, 1).reshape(batch, 1, heads * self.v_dim))  # [B, 1, h*v] -> [B, 1, H]

    def absorbed_weights(self, kv_b_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of `kv_b_proj` for the absorbed (decode) form, as views of `kv_b_weight`.

        kv_b_weight [h*(nope+v), kv_rank] (default: kv_b_proj.weight; pass the effective weight when an
        adapter wraps the layer) -> W_UK [h, nope, kv_rank], W_UV [h, v, kv_rank]. Then
        q_nope·k_nope = (q_nope·W_UK)·c and softmax·v = (softmax·c)·W_UVᵀ.
        """
        weight = self.kv_b_proj.weight if kv_b_weight is None else kv_b_weight
        per_head = weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)  # [h, nope+v, rank]
        return per_head[:, : self.nope_dim], per_head[:, self.nope_dim :]


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """Causal attention within segments: q, k [B, S, h, qk], v [B, S, h, v] -> [B, S, h, v], zeros at
    tokens the segments leave out (padding)."""
    batch, seq, heads = q.shape[:3]
    flat = [t.reshape(batch * seq, heads, t.shape[-1]) for t in (q, k, v)]  # [B*S, h, d] each
    if segments.keep is not None:
        flat = [t.index_select(0, segments.keep) for t in flat]  # [T, h, d]
    out = varlen_attention(*flat, segments.cu_seqlens, segments.max_len, scale)  # [T, h, v]
    if segments.keep is not None:
        out = out.new_zeros(batch * seq, heads, out.shape[-1]).index_copy(0, segments.keep, out)  # [B*S, h, v]
    return out.view(batch, seq, heads, -1)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA over [B, h, S, d] tensors; mask None = causal (align.kernels.causal_attention: cuDNN on Hopper,
    elsewhere on CUDA v padded for SDPA's flash kernel)."""
    if mask is None:
        return causal_attention(q, k, v, scale)  # [B, h, S, v]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
