"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules are multipliers of the base lr as a function of the optimizer step about to be taken
(0-based), wrapped in LambdaLR so their state (the step count) saves and resumes with the run:
- cosine:   linear warmup, then half a cosine from 1 down to `min_lr_ratio`;
- step:     linear warmup, then 1, times `step_factor` after each fraction in `step_at` of the
            steps (DeepSeek-V2: x0.316 at 80% and again at 90%);
- constant: linear warmup, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (decayed) and vectors (norms, biases; not decayed)."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module, lr: float, betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.optim.AdamW:
    groups = param_groups(model.named_parameters(), weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    # one fused kernel per step on the GPU (steps counted on the device); the CPU keeps the foreach path
    fused = all(p.is_cuda for group in groups for p in group["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, fused=fused)


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if step < warmup else None


def cosine_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def fn(step: int) -> float:
        warm = _warmup(step, warmup)
        if warm is not None:
            return warm
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def step_lambda(total: int, warmup: int, at: Sequence[float], factor: float) -> Callable[[int], float]:
    boundaries = sorted(int(round(fraction * total)) for fraction in at)

    def fn(step: int) -> float:
        warm = _warmup(step, warmup)
        if warm is not None:
            return warm
        return factor ** sum(step >= b for b in boundaries)

    return fn


def constant_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: _warmup(step, warmup) or 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
    min_lr_ratio: float = 0.0, step_at: Sequence[float] = (0.8, 0.9), step_factor: float = 0.316,
) -> LambdaLR:
    if name == "cosine":
        fn = cosine_lambda(total_steps, warmup_steps, min_lr_ratio)
    elif name == "step":
        fn = step_lambda(total_steps, warmup_steps, step_at, step_factor)
    elif name == "constant":
        fn = constant_lambda(warmup_steps)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected cosine, step or constant")
    return LambdaLR(optimizer, fn)
