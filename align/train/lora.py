"""LoRA for DeepSeek-V2 through peft: attention, dense-MLP and shared-expert weights by default.

Default targets: the attention projections (`q_proj`, or `q_a_proj` / `q_b_proj` with query
compression), `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`; the dense MLP (layers before
`first_k_dense_replace`) and the shared experts (`gate_proj`, `up_proj`, `down_proj`). Routed experts
stay frozen unless `routed_experts=True`, which adds the stacked `mlp.experts.gate_up_proj` /
`mlp.experts.down_proj` parameters through peft's `target_parameters`.

Why the MLP linears go through `target_parameters` too: peft 0.21 on transformers v5 rewrites a
deepseek_v2 config's `target_modules` entries named gate_proj / up_proj / down_proj into the fused
routed-expert parameters (its v4 -> v5 MoE compatibility shim, peft/utils/transformers_weight_conversion
.py), both when the adapter is created and when it is loaded. Naming the dense / shared-expert weights
as parameters (`mlp.gate_proj.weight`, `shared_experts.gate_proj.weight`, ...) is left alone by that
shim, so the adapter means the same thing in our model and in transformers' own DeepseekV2.
peft's parameter-targeted LoRA has no dropout, so `dropout` must be 0 when any MLP target is used.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from align.models.split_lora import split_adapters

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")
EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def _present(model: torch.nn.Module, targets: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split targets into (module names, parameter names, not found) for this model."""
    modules = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {name for name, _ in model.named_parameters()}

    def hit(names: set[str], target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    as_modules, as_params, missing = [], [], []
    for target in targets:
        mlp_linear = target.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")
        if target in EXPERT_TARGETS and hit(params, target):
            as_params.append(target)
        elif mlp_linear and hit(params, target + ".weight"):
            as_params.append(target + ".weight")
        elif not mlp_linear and hit(modules, target):
            as_modules.append(target)
        elif not (target in ATTENTION_TARGETS or target in MLP_TARGETS):
            missing.append(target)  # defaults absent from this shape (q_a_proj without q_lora_rank) are fine
    return as_modules, as_params, missing


def lora_config(
    model: torch.nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
    targets: list[str] | None = None, routed_experts: bool = False,
) -> LoraConfig:
    """A peft LoraConfig for `model` (names resolved against it; unknown targets are an error)."""
    wanted = list(targets if targets is not None else DEFAULT_TARGETS)
    if routed_experts:
        wanted += [t for t in EXPERT_TARGETS if t not in wanted]
    modules, params, missing = _present(model, wanted)
    if missing:
        raise ValueError(
            f"lora.targets: {missing} match no Linear module or parameter of this model; valid: "
            f"{', '.join(DEFAULT_TARGETS + EXPERT_TARGETS)}"
        )
    if not modules and not params:
        raise ValueError(f"lora.targets {wanted}: nothing to adapt in this model")
    if params and dropout:
        raise ValueError(
            f"lora.dropout is {dropout}; peft's parameter-targeted LoRA (used for the MLP / expert targets "
            f"{params}) supports no dropout: set lora.dropout=0 or target attention projections only"
        )
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
        target_parameters=params or None, bias="none",
    )


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap `model` (in place) with fresh LoRA adapters; only they are trainable. In align's model the
    MLP and expert adapters run split, (x·A)·B beside the frozen product (align/models/split_lora.py)."""
    peft_model = get_peft_model(model, config)
    split_adapters(peft_model)
    return peft_model


def trainable_summary(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({trainable / max(total, 1):.2%})"
