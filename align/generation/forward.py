"""Model passes for generation, built from the model's own modules (norms, MLA projections, MLP/MoE,
final norm, lm_head): a packed prefill that fills the latent cache, and a one-token decode step.

`unwrap` accepts our DeepseekV2ForCausalLM or a PEFT model around it; adapters stay live because
every projection except kv_b_proj is called as a module (kv_b_proj: see weights.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from align.generation.attention import decode_attention, prefill_attention
from align.generation.cache import LatentCache
from align.kernels.grouped_mm import grouped_linear
from align.models.mla import attention_mask_for, document_ids
from align.models.model import DeepseekV2ForCausalLM
from align.models.moe import Experts


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


def _routed_experts(experts: Experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor):
    """Experts.forward for the decode step, with two changes that keep it on the device and exact
    from run to run: per-expert counts by an integer scatter-add (torch.bincount reads its maximum
    back to the host on CUDA, which a CUDA graph cannot capture), and the k expert outputs of a
    token summed in a fixed order (no floating-point atomics, so seeded sampling repeats bit for bit).
    x [T, H], weights/chosen [T, k] -> [T, H]."""
    tokens, k = chosen.shape
    flat = chosen.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k] routed slots sorted by expert
    counts = torch.zeros(experts.gate_up_proj.shape[0], dtype=torch.long, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # [E]
    gate, up = grouped_linear(x[order // k], experts.gate_up_proj, counts).chunk(2, dim=-1)  # [T*k, I]
    out = grouped_linear(F.silu(gate) * up, experts.down_proj, counts)  # [T*k, H] in sorted order
    out = out[order.argsort()].view(tokens, k, -1)  # [T, k, H] back in (token, choice) order
    return (out * weights[..., None].to(out.dtype)).sum(1).to(x.dtype)  # [T, H]


def _mlp(layer, h: torch.Tensor, capturable: bool) -> torch.Tensor:
    if not layer.is_moe:
        return layer.mlp(h)
    moe = layer.mlp
    if not capturable or type(moe.experts) is not Experts:  # e.g. PEFT-wrapped experts: call the module
        return moe(h)[0]
    flat = h.reshape(-1, h.shape[-1])  # [B*S, H]
    weights, chosen, _ = moe.gate(flat)
    out = _routed_experts(moe.experts, flat, weights, chosen).view_as(h)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(h)
    return out


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
        x = x + _mlp(layer, layer.post_attention_layernorm(x), capturable=False)


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
    for index, layer in enumerate(body.layers):
        h = layer.input_layernorm(x)
        x = x + decode_attention(layer.self_attn, h, cos, sin, cache, index, positions, attend_len)
        x = x + _mlp(layer, layer.post_attention_layernorm(x), capturable=True)
    return model.lm_head(body.norm(x))[:, 0].float()  # [B, V]
