"""The weight a (possibly adapter-wrapped) linear layer applies right now, without keeping a copy.

Decode in absorbed form multiplies the query by the key half of `kv_b_proj` and the attention
output by its value half, so it needs the layer's weight matrix rather than a call of the layer.
When PEFT has wrapped the layer in a LoRA `Linear`, the effective weight is
W + sum over active adapters of scaling * B @ A, following PEFT's own forward rules (adapters
disabled -> base weight; merged -> base weight already holds them). It is recomputed from the live
parameters on every call, so an optimiser step between two generations is honoured. Any other
wrapper (LoRA variants such as DoRA, quantised layers) is probed exactly: module(I)ᵀ.
"""

from __future__ import annotations

import torch
from torch import nn


def _peft_lora_linear():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is a dependency, but keep plain models usable without it
        return None
    return Linear


def _lora_weight(module) -> torch.Tensor | None:
    """Effective weight of a PEFT LoRA Linear with vanilla adapters, or None for a LoRA variant."""
    base = module.get_base_layer()
    if module.disable_adapters:
        if module.merged:
            module.unmerge()  # what PEFT's own forward does
        return base.weight
    if module.merged:
        return base.weight
    weight = base.weight
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in module.lora_variant:
            return None
        weight = weight + module.get_delta_weight(name).to(weight.dtype)  # [out, in]
    return weight


def _probe_weight(module: nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """module(I)ᵀ - exact for any bias-free linear map."""
    eye = torch.eye(in_features, dtype=like.dtype, device=like.device)  # [in, in]
    return module(eye).transpose(0, 1)  # [out, in]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] weight that `module(x) == x @ weight.T` for a bias-free linear layer (LoRA-aware)."""
    if type(module) is nn.Linear:
        return module.weight
    lora_linear = _peft_lora_linear()
    if lora_linear is not None and isinstance(module, lora_linear):
        weight = _lora_weight(module)
        if weight is not None:
            return weight
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not hasattr(base, "weight") or base.weight.dim() != 2:
        raise TypeError(f"cannot find the weight of {type(module).__name__}: expected a Linear layer")
    return _probe_weight(module, base.weight.shape[1], base.weight)
