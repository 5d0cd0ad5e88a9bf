"""Decoupled rotary embedding for MLA, with YaRN.

Inverse frequencies and the YaRN cos/sin magnitude come from transformers' own RoPE initialisers
(`ROPE_INIT_FUNCTIONS`), so every rope type a config can name is computed the way the reference
computes it. Applying the rotation is `align.kernels.rope.apply_rope` (the decode kernels share it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = config.rope_parameters or {}
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


def _default_inv_freq(config, device: str) -> tuple[torch.Tensor, float]:
    dim, base = config.qk_rope_head_dim, config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0


class RotaryEmbedding(nn.Module):
    """Holds inv_freq as a plain CPU tensor (not a buffer), so models built on the meta device and
    materialised with `to_empty` keep exact frequencies; copies are cached per device."""

    def __init__(self, config):
        super().__init__()
        config.head_dim = config.qk_rope_head_dim  # what transformers' initialisers read
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        init = _default_inv_freq if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        with torch.device("cpu"):  # also when the model is being built on the meta device
            inv_freq, self.attention_scaling = init(config, "cpu")
        self._inv_freq = {torch.device("cpu"): inv_freq.float()}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, rope_dim/2] in float32."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
