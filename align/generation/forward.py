"""The engine's two model passes, both through the model's own modules (align/models): a packed
prefill that fills the latent cache (`DeepseekV2Model.fill_cache`, i.e. each layer's `forward`) and
a one-token decode step (`DeepseekV2Model.decode`, i.e. each layer's `decode`) with the LM head.

`unwrap` accepts our DeepseekV2ForCausalLM or a PEFT model around it; adapters stay live because
the passes call the wrapped modules (kv_b_proj in the decode step: see align/models/adapters.py).
"""

from __future__ import annotations

import torch
from torch import nn

from align.generation.cache import LatentCache
from align.models.layout import attention_layout
from align.models.model import DeepseekV2ForCausalLM
from align.models.moe import RoutingTrace


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


@torch.no_grad()
def prefill(
    model: DeepseekV2ForCausalLM, cache: LatentCache, ids: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, documents: int, routing: RoutingTrace | None = None,
) -> None:
    """Fill the cache for `documents` packed prompts; ids/positions/slots [S], positions restarting at
    0 for each prompt. Token i goes to cache (slots[i], positions[i]); attention stays within each
    prompt. No logits: the engine feeds each prompt's last token through the decode step. routing:
    records the MoE layers' routing of the S tokens.
    """
    pos = positions[None]  # [1, S]
    like = model.model.embed_tokens.weight  # the activations' device and dtype
    mask = attention_layout(like, pos, None, shape=tuple(pos.shape)) if documents > 1 else None
    model.model.fill_cache(ids[None], pos, mask, cache.writer(slots, positions), routing)


def decode_logits(
    model: DeepseekV2ForCausalLM, cache: LatentCache, tokens: torch.Tensor, positions: torch.Tensor,
    attend_len: int, routing: RoutingTrace | None = None,
) -> torch.Tensor:
    """One token per slot: tokens/positions [slots] -> next-token logits [slots, V] in float32.

    Static shapes and no host reads, so the call can be captured in a CUDA graph. routing: records
    each MoE layer's routing of the step's tokens.
    """
    hidden = model.model.decode(tokens, positions, cache, attend_len, routing)  # [B, 1, H]
    return model.lm_head(hidden)[:, 0].float()  # [B, V]
