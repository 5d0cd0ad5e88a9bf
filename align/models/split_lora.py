"""Split LoRA: the MLP and routed-expert adapters computed beside the frozen product, (x·A)·B.

peft adapts the dense-MLP / shared-expert linears and the stacked routed experts of DeepSeek-V2
through `target_parameters` (align/train/lora.py says why), and its ParamWrapper applies an adapter
by rebuilding the whole weight W + scaling·B·A in every forward (a parametrization): for the routed
experts that is a second copy of every expert stack, forward and backward. The adapters here are the
same peft modules with the same parameters and saved files; only their forward changes:
- a wrapped nn.Linear returns base(x) + scaling · B(A(x)), what peft's own lora.Linear computes;
- wrapped routed experts pass the factors to `routed_experts`, which adds two grouped products of
  rank r beside each frozen grouped GEMM (align/kernels/grouped_mm.py).
peft's module-targeted lora.Linear (the attention projections) keeps its forward but, under autocast,
no longer casts its input to the adapter's float32 (`AutocastLoraLinear`): that cast made every adapter
keep its own 16-bit copy of x for backward (autocast casts it back) where they can share x itself.
Disabled or merged adapters fall back to peft's forward. Only align's model is converted: a peer
model keeps peft's behaviour (the benchmarks' baseline).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from align.kernels.grouped_mm import LowRank
from align.kernels.moe_experts import routed_experts
from align.models.mla import MLA
from align.models.moe import MLP, Experts


def _active(wrapper: ParamWrapper) -> list[str] | None:
    """The adapters to apply split, or None where peft's own forward must run (disabled / merged)."""
    if wrapper.disable_adapters or wrapper.merged:
        return None
    return [name for name in wrapper.active_adapters if name in wrapper.lora_A]


class SplitLinear(ParamWrapper):
    """peft's ParamWrapper on an nn.Linear weight, applied as base(x) + scaling * B(A(x))."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = _active(self)
        if names is None:
            return super().forward(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for name in names:
            out = out + self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return out


class AutocastLoraLinear(LoraLinear):
    """peft's lora.Linear, leaving the input's dtype to autocast where autocast is on (same values: the
    16-bit input went to float32 and back); without autocast, peft's cast to the adapter's dtype."""

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return super()._cast_input_dtype(x, dtype)


def expert_factors(wrapper: ParamWrapper, name: str) -> LowRank:
    """The adapter `name` of a stacked-expert ParamWrapper as a LowRank: a [E, r, in], b [E, out, r]."""
    if not wrapper._did_swap_in_out_features:
        raise TypeError(f"split LoRA expects stacked expert weights laid out [E, out, in]: {wrapper.parameter_name}")
    a = wrapper.lora_A[name].weight  # [E*r, in], expert-major
    b = wrapper.lora_B[name].weight  # [out, r*E], rank-major
    n = wrapper.num_experts
    a = a.reshape(n, -1, a.shape[-1])  # [E, r, in]
    b = b.reshape(b.shape[0], -1, n).permute(2, 0, 1).contiguous()  # [E, out, r]
    dtype = wrapper.get_param().dtype
    return LowRank(a.to(dtype), b.to(dtype), wrapper.scaling[name])


class SplitExperts(ParamWrapper):
    """The outermost of peft's nested ParamWrappers on routed Experts; the factors of every wrapper in
    the chain go to the grouped expert GEMMs."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        chain, module = [], self
        while isinstance(module, ParamWrapper):
            chain.append(module)
            module = module.base_layer
        active = [_active(w) for w in chain]
        if any(names is None for names in active):
            return super().forward(x, weights, experts)
        updates: dict[str, tuple[LowRank, ...]] = {}
        for wrapper, names in zip(chain, active, strict=True):
            updates[wrapper.parameter_name] = tuple(expert_factors(wrapper, n) for n in names)
        return routed_experts(x, weights, experts, module.gate_up_proj, module.down_proj, updates)


def split_adapters(model: nn.Module) -> int:
    """Give peft's ParamWrappers in align's MLPs and Experts the split forward, and its lora.Linear
    layers in align's attention the autocast input, in place; returns how many were converted (0 for a
    model that is not align's)."""
    converted = 0
    for parent in model.modules():
        for child in parent.children():
            if type(child) is LoraLinear and isinstance(parent, MLA):
                child.__class__ = AutocastLoraLinear
                converted += 1
                continue
            if type(child) is not ParamWrapper:
                continue
            base = child.get_base_layer()
            if isinstance(base, Experts) and not isinstance(parent, ParamWrapper):
                child.__class__ = SplitExperts
            elif isinstance(parent, MLP) and isinstance(base, nn.Linear) and child.base_layer is base:
                child.__class__ = SplitLinear
            else:
                continue
            converted += 1
    return converted
