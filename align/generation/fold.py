"""LoRA folded into the rollout passes: W + ΔW computed once per generation call, then plain matmuls.

With adapters live, every decode step would redo each adapter's low-rank work (peft's `lora.Linear`
adds x·Aᵀ·Bᵀ per projection; its parameter-targeted `ParamWrapper`, used for the MLP linears and the
routed experts, rebuilds W + B·A on every call). The weights do not change during a generation call,
so `DecodeWeights.applied(model)` computes each adapted weight's W + Σ scaling·B·A once, from the live
adapter parameters (lora_A / lora_B / scaling of each peft layer, whatever the training forward does
with them), into a decode-side buffer, and for the duration of the call swaps that buffer in as the
base layer's parameter and disables the layer's adapter (as peft's `disable_adapter()` does): the
model's own modules then run plain matmuls over the folded weights, for prefill and decode alike.
Everything is restored on exit, even on error.

Buffers are kept between calls and rewritten in place, so their addresses are stable and captured
CUDA graphs (keyed on parameter addresses, align/generation/graphs.py) stay valid across rounds; the
fold is recomputed on every call, so an optimizer step between rounds is always seen. A call with
no live adapter (none, disabled, or merged into the base weights) folds nothing and frees the buffers.

Routed experts (`lora.routed_experts`): folded into a copy of the stacked expert weights when the
device has room for it (V2-Lite: ~29 GB bf16 on top of the model), else left live with a warning.
A copy was chosen over two extra low-rank grouped GEMMs inside the expert kernel: the decode step is
then exactly the adapter-free step (the fastest we have), the fold is one batched matmul per layer
per round (~2 × 29 GB of memory traffic, tens of ms on an H200, against seconds of decoding), and
nothing in the kernels changes; the price is the memory, hence the check. `experts=False` keeps them
live always. LoRA variants (DoRA, ...), adapter biases and unknown wrappers stay live too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

HEADROOM = 0.1  # routed-expert copies leave this fraction of the device's memory free


def _peft_classes() -> tuple[type, type] | None:
    try:
        from peft.tuners.lora.layer import Linear, ParamWrapper
    except ImportError:
        return None
    return Linear, ParamWrapper


@dataclass
class _Target:
    layer: nn.Module  # the peft layer whose adapters are folded
    owner: nn.Module  # the module holding the weight (the innermost base layer)
    name: str  # the weight's attribute name on owner
    adapters: list[str]  # active adapters of this layer to fold


def _active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _targets(model: nn.Module) -> list[_Target]:
    """The adapter layers whose live LoRA can be folded: enabled, unmerged, plain (no variant, no bias)."""
    classes = _peft_classes()
    if classes is None:
        return []
    linear, wrapper = classes
    found = []
    for module in model.modules():
        if not isinstance(module, (linear, wrapper)) or module.disable_adapters or module.merged:
            continue
        adapters = _active(module)
        if not adapters:
            continue
        if getattr(module, "fan_in_fan_out", False) or any(
            a in getattr(module, "lora_variant", {}) or module.lora_bias.get(a, False) for a in adapters
        ):
            continue  # DoRA and other variants, adapter biases, transposed weights: the layer's own forward
        name = module.parameter_name if isinstance(module, wrapper) else "weight"
        found.append(_Target(module, module.get_base_layer(), name, adapters))
    return found


def _fold_into(out: torch.Tensor, target: _Target) -> None:
    """out = W + Σ_adapters scaling · B·A in W's layout (one rounding: addmm / baddbmm with beta = 1)."""
    layer = target.layer
    base = target.owner._parameters[target.name]
    first = True
    for adapter in target.adapters:
        a = layer.lora_A[adapter].weight.to(base.dtype)  # [r * E, in_A]
        b = layer.lora_B[adapter].weight.to(base.dtype)  # [out_B, r * E]
        scaling = float(layer.scaling[adapter])
        if base.dim() == 2:  # lora.Linear and 2-D ParamWrapper: W [out, in], A [r, in], B [out, r]
            if first:
                torch.addmm(base, b, a, alpha=scaling, out=out)
            else:
                out.addmm_(b, a, alpha=scaling)
        else:  # stacked experts: peft keeps E experts' factors side by side (see ParamWrapper.get_delta_weight)
            experts = base.shape[0]
            a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in_A]
            b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # [E, out_B, r]
            if getattr(layer, "_did_swap_in_out_features", True):  # W [E, out_B, in_A] (our Experts)
                left, right = b, a
            else:  # W [E, in_A, out_B]
                left, right = a.transpose(1, 2), b.transpose(1, 2)
            if tuple(base.shape) != (experts, left.shape[1], right.shape[2]):
                raise RuntimeError(
                    f"cannot fold the LoRA of {type(layer).__name__}.{target.name}: weight {tuple(base.shape)}, "
                    f"factors {tuple(left.shape)} x {tuple(right.shape)}"
                )
            if first:
                torch.baddbmm(base, left, right, alpha=scaling, out=out)
            else:
                out.baddbmm_(left, right, alpha=scaling)
        first = False


def _room_for(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch
    return nbytes <= free - HEADROOM * total


class DecodeWeights:
    """Decode-side folded weights of one model, kept between generation calls (one per engine).

    experts: also fold LoRA on routed experts (stacked 3-D weights), when the device has room."""

    def __init__(self, experts: bool = True):
        self.experts = experts
        self.buffers: dict[tuple[int, str], nn.Parameter] = {}  # (id(owner), name) -> folded weight
        self.warned = False

    def clear(self) -> None:
        self.buffers = {}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.buffers.values())

    def _plan(self, model: nn.Module) -> list[_Target]:
        targets = _targets(model)
        stacked = [t for t in targets if t.owner._parameters[t.name].dim() == 3]
        if stacked and self.experts:
            new = [t for t in stacked if (id(t.owner), t.name) not in self.buffers]
            nbytes = sum(t.owner._parameters[t.name].nbytes for t in new)
            if new and not _room_for(nbytes, new[0].owner._parameters[new[0].name].device):
                self.buffers = {k: v for k, v in self.buffers.items() if v.dim() != 3}
                self._warn(nbytes)
                return [t for t in targets if t not in stacked]
            return targets
        return [t for t in targets if t not in stacked]

    def _warn(self, nbytes: int) -> None:
        if not self.warned:
            warnings.warn(
                f"not folding the routed-expert LoRA into the rollout weights: the copy needs "
                f"{nbytes / 2**30:.1f} GiB the device does not have free; their adapters stay live (slower decode)",
                stacklevel=4,
            )
            self.warned = True

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[int]:
        """Within the block, every foldable adapter layer of `model` runs as a plain layer over W + ΔW
        (recomputed now from the live adapter parameters). Yields how many weights were folded."""
        targets = self._plan(model)
        keys = {(id(t.owner), t.name) for t in targets}
        self.buffers = {k: v for k, v in self.buffers.items() if k in keys}  # drop what is no longer live
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        disabled: list[nn.Module] = []
        try:
            with torch.no_grad():
                for target in targets:
                    base = target.owner._parameters[target.name]
                    key = (id(target.owner), target.name)
                    buffer = self.buffers.get(key)
                    if buffer is None or buffer.shape != base.shape or buffer.dtype != base.dtype \
                            or buffer.device != base.device:
                        buffer = nn.Parameter(torch.empty_like(base), requires_grad=False)
                        self.buffers[key] = buffer
                    _fold_into(buffer.data, target)
            for target in targets:
                key = (id(target.owner), target.name)
                swapped.append((target.owner, target.name, target.owner._parameters[target.name]))
                target.owner._parameters[target.name] = self.buffers[key]
            for target in targets:  # nested ParamWrappers: each layer is disabled once
                if not target.layer._disable_adapters:
                    target.layer._disable_adapters = True
                    disabled.append(target.layer)
            yield len(targets)
        finally:
            for layer in disabled:
                layer._disable_adapters = False
            for owner, name, param in reversed(swapped):
                owner._parameters[name] = param
