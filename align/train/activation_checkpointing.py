"""How each decoder layer runs in training: as it is, checkpointed (`train.gradient_checkpointing: true`:
backward re-runs the whole layer) or selectively checkpointed (`selective`: the outputs of the layer's
matrix products and attention are kept, everything else is recomputed, so backward re-runs no GEMM).

`selective` is PyTorch's selective activation checkpointing (SAC): `save_matmuls` is the policy, asked
for every aten op the layer's forward dispatches. On the paths a training forward takes:
- CPU / float32: nn.Linear (mm / addmm), the grouped experts' padded `bmm`, SDPA (flash for CPU, or
  the math path's bmm) and the per-segment SDPA of packed rows: all saved.
- CUDA bf16: nn.Linear, `torch._grouped_mm` (Hopper) or `bmm`, SDPA's flash / efficient / cuDNN kernels
  and FlashAttention varlen (the custom op `torch_attn::_varlen_attn`): all saved.
- The Triton kernels with a backward (RMSNorm, RoPE, SwiGLU, the experts' combine: autograd.Functions
  in align/kernels) are raw launches SAC never sees: they are recomputed, as the cheap elementwise /
  memory-bound passes they are; only their `torch.empty` outputs and reshapes dispatch as aten ops.
  The forward-only Triton kernels do not run where a gradient flows.

Layers are switched one by one: each DecoderLayer gets an instance `forward` (a `LayerForward`) that
checkpoints, and runs through the compiled `run_layer` when train.compile is on (align/train/
regional_compile.py, which says where the checkpoint sits for each mode). Eval and generation (no
gradient, or the module in eval mode) run the layer's own forward.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from align.models.model import DecoderLayer

Checkpointing = Literal[False, True, "selective"]


def _ops(*names: str) -> frozenset:
    """The default overloads of the named ops that this torch build has (`ns.op`, aten by default)."""
    found = set()
    for name in names:
        namespace, _, op = name.rpartition(".")
        packet = getattr(getattr(torch.ops, namespace or "aten"), op, None)
        if packet is not None:
            found.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(found)


SAVED_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward", "torch_attn._varlen_attn",
)


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """SAC policy: keep the outputs of matrix products and attention, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """A fresh pair of SAC contexts (the checkpoint's `context_fn`)."""
    return create_selective_checkpoint_contexts(save_matmuls)


def run_layer(layer: torch.nn.Module, mode: Checkpointing, *args, **kwargs):
    """The layer's own forward on args, checkpointed as `mode` says (False: not at all)."""
    forward = functools.partial(type(layer).forward, layer)
    if mode is False:
        return forward(*args, **kwargs)
    if mode == "selective":
        return checkpoint(forward, *args, use_reentrant=False, context_fn=selective_contexts, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class LayerForward:
    """A decoder layer's instance `forward` in training: run_layer (or its compiled form) with a
    checkpointing mode; without a gradient, or in eval mode, the layer's own forward."""

    def __init__(self, mode: Checkpointing, runner: Callable = run_layer):
        self.mode, self.runner = mode, runner

    def __call__(self, layer: torch.nn.Module, *args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return type(layer).forward(layer, *args, **kwargs)
        return self.runner(layer, self.mode, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, DecoderLayer)]


def set_layer_forward(model: torch.nn.Module, mode: Checkpointing, runner: Callable | None = None) -> int:
    """Give every decoder layer of model (peft-wrapped or not) the training forward for `mode`, run by
    `runner` (default run_layer, eager); returns the layers changed. Mode False without a runner gives
    the layers back their own forward."""
    if mode not in (False, True, "selective"):
        raise ValueError(f"train.gradient_checkpointing: expected one of true, false, 'selective', got {mode!r}")
    layers = decoder_layers(model)
    forward = None if mode is False and runner is None else LayerForward(mode, runner or run_layer)
    for layer in layers:
        if forward is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = types.MethodType(forward, layer)
    return len(layers)
