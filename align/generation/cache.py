"""Latent KV cache for MLA decode: per token and layer only c (kv_lora_rank) and k_pe (qk_rope_head_dim).

One preallocated tensor `[layers, slots, max_len, kv_rank + rope_dim]` in the model dtype (576 values
per token per layer at V2-Lite shape, i.e. 27 * 576 * 2 B = 31 KiB per token in bf16); the
decompressed keys and values are never stored. A slot holds one sequence; positions are explicit
(the engine keeps them in a device tensor), so the cache itself has no notion of "current length".
Storing c and k_pe side by side lets decode score [q_latent | q_pe] against one row in one matmul.
"""

from __future__ import annotations

import torch


class CacheError(ValueError):
    """A request the cache cannot hold (prompt longer than the cache, too many sequences)."""


class LatentCache:
    def __init__(
        self, layers: int, slots: int, max_len: int, kv_rank: int, rope_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ):
        if slots < 1 or max_len < 1:
            raise CacheError(f"latent cache needs slots >= 1 and max_len >= 1, got {slots} and {max_len}")
        self.kv_rank, self.rope_dim = kv_rank, rope_dim
        self.data = torch.zeros(layers, slots, max_len, kv_rank + rope_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config, slots: int, max_len: int, dtype: torch.dtype, device) -> LatentCache:
        return cls(
            config.num_hidden_layers, slots, max_len, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device
        )

    @property
    def slots(self) -> int:
        return self.data.shape[1]

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes one cached token costs over all layers."""
        return self.data.shape[0] * self.data.shape[3] * self.data.element_size()

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> torch.Tensor:
        """[slots, max_len, kv_rank + rope_dim] view of one layer."""
        return self.data[index]

    def write(
        self, layer: int, slot: torch.Tensor, pos: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor
    ) -> None:
        """Store tokens at (slot[i], pos[i]); slot/pos [N] int64, c [N, kv_rank], k_pe [N, rope]."""
        row = torch.cat([c, k_pe], dim=-1).to(self.data.dtype)  # [N, kv_rank + rope]
        self.data[layer].index_put_((slot, pos), row)

    def writer(self, slot: torch.Tensor, pos: torch.Tensor) -> PrefillWriter:
        """The `cache` a packed prefill hands the model (DeepseekV2Model.fill_cache): token i of the
        pass goes to (slot[i], pos[i]); slot/pos [S]."""
        return PrefillWriter(self, slot, pos)

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy positions [0, length) of slots src[i] into slots dst[i], all layers; src/dst [N] int64."""
        if length > 0 and dst.numel():
            self.data[:, dst, :length] = self.data[:, src, :length]  # [L, N, length, D]


class PrefillWriter:
    """The transformers-Cache call MLA.forward makes (`update(c, k_pe, layer)` -> the latents to
    attend over), for a packed prefill: stores the pass's latents [1, 1, S, d] in the latent cache
    and returns them unchanged (each prompt attends within itself, nothing cached before)."""

    def __init__(self, cache: LatentCache, slot: torch.Tensor, pos: torch.Tensor):
        self.cache, self.slot, self.pos = cache, slot, pos

    def update(self, c: torch.Tensor, k_pe: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write(layer, self.slot, self.pos, c[0, 0], k_pe[0, 0])
        return c, k_pe
