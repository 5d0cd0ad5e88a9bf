"""Model passes for generation, built from the model's own modules (norms, MLA projections, MLP/MoE,
final norm, lm_head): a packed prefill that fills the latent cache, and a one-token decode step.

`unwrap` accepts our DeepseekV2ForCausalLM or a PEFT model around it; adapters stay live because
every projection except kv_b_proj is called as a module (kv_b_proj: see weights.py).
"""

from __future__ import annotations

import torch
from torch import nn

from align.generation.attention import decode_attention, prefill_attention
from align.generation.cache import LatentCache
from align.kernels.mla_decode import fused_decode_available
from align.kernels.rms_norm import add_rms_norm
from align.models.mla import attention_mask_for, document_ids
from align.models.model import DeepseekV2ForCausalLM


def unwrap(model: nn.Module) -> DeepseekV2ForCausalLM:
    """Our causal LM inside `model`: itself, or inside a PEFT, torch.compile or DDP wrapper."""
    base = model
    for _ in range(4):
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        elif isinstance(getattr(base, "_orig_mod", None), nn.Module):
            base = base._orig_mod
        elif isinstance(getattr(base, "module", None), nn.Module):
            base = base.module
        else:
            break
    if not isinstance(base, DeepseekV2ForCausalLM):
        raise TypeError(
            f"generation needs align.models.DeepseekV2ForCausalLM (optionally PEFT-wrapped), got "
            f"{type(base).__name__}"
        )
    return base


def _mlp(layer, h: torch.Tensor) -> torch.Tensor:
    return layer.mlp(h)[0] if layer.is_moe else layer.mlp(h)


@torch.no_grad()
def prefill(
    model: DeepseekV2ForCausalLM, cache: LatentCache, ids: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, documents: int,
) -> None:
    """Fill the cache for `documents` packed prompts; ids/positions/slots [S], positions restarting at
    0 for each prompt. Token i goes to cache (slots[i], positions[i]); attention stays within each
    prompt. No logits: the engine feeds each prompt's last token through the decode step.
    """
    body = model.model
    pos = positions[None]  # [1, S]
    mask = attention_mask_for(document_ids(pos), None, pos.shape[1], ids.device) if documents > 1 else None
    cos, sin = body.rotary_emb(pos)
    x = body.embed_tokens(ids[None])  # [1, S, H]
    last = len(body.layers) - 1
    for index, layer in enumerate(body.layers):
        h = layer.input_layernorm(x)
        attn = prefill_attention(
            layer.self_attn, h, cos, sin, mask, cache, index, slots, positions, need_output=index < last
        )
        if attn is None:
            break
        x = x + attn
        x = x + _mlp(layer, layer.post_attention_layernorm(x))


def decode_logits(
    model: DeepseekV2ForCausalLM, cache: LatentCache, tokens: torch.Tensor, positions: torch.Tensor,
    attend_len: int,
) -> torch.Tensor:
    """One token per slot: tokens/positions [slots] -> next-token logits [slots, V] in float32.

    Static shapes and no host reads, so the call can be captured in a CUDA graph.
    """
    body = model.model
    cos, sin = body.rotary_emb(positions[:, None])  # [B, 1, rope/2]
    x = body.embed_tokens(tokens[:, None])  # [B, 1, H]
    fused = fused_decode_available(x)
    delta = None
    for index, layer in enumerate(body.layers):
        x, h = _add_norm(x, delta, layer.input_layernorm, fused)
        attn = decode_attention(layer.self_attn, h, cos, sin, cache, index, positions, attend_len)
        x, h = _add_norm(x, attn, layer.post_attention_layernorm, fused)
        delta = _mlp(layer, h)
    _, h = _add_norm(x, delta, body.norm, fused)
    return model.lm_head(h)[:, 0].float()  # [B, V]


def _add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module, fused: bool):
    """(x + delta, norm(x + delta)); delta None leaves x as it is. Fused: one Triton launch."""
    if fused and norm.weight.dtype == x.dtype:
        return add_rms_norm(x, delta, norm.weight, norm.eps)
    if delta is not None:
        x = x + delta
    return x, norm(x)
