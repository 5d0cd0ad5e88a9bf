"""Group-relative advantages for GRPO, defined as TRL 1.16's GRPOTrainer defines them.

Rewards arrive as one flat tensor of ``B·G`` values, the ``G`` completions of each prompt
consecutive. A reward may be NaN (every reward function returned ``None`` for that
completion; :func:`rewards.registry.combine_scores` is that rule): it is left out of the
statistics and its advantage is 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]

ADVANTAGE_EPS = 1e-4
"""Added to the standard deviation before dividing (TRL's constant, not configurable there)."""


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel-corrected) standard deviation ignoring NaNs; NaN where fewer than 2 values.

    ``std = sqrt(Σ(x − x̄)² / (n − 1))`` over the non-NaN entries, as ``trl.trainer.utils.nanstd``.
    """
    keep = ~torch.isnan(x)
    count = keep.sum(dim=dim, keepdim=True) if dim is not None else keep.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=dim is not None)
    var = var * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = ADVANTAGE_EPS,
) -> Tensor:
    """Advantage of each completion relative to its group of ``G = group_size`` siblings.

    ``Â_i = (r_i − mean_group(r)) / (σ + eps)`` where ``mean_group`` is the NaN-ignoring mean of the
    ``G`` rewards of the same prompt and ``σ`` is the unbiased standard deviation:

    - ``"group"``: ``σ`` over the ``G`` rewards of the group;
    - ``"batch"``: ``σ`` over all ``B·G`` rewards given (the baseline stays the group mean);
    - ``"none"``: no division, ``Â_i = r_i − mean_group(r)`` (Dr. GRPO).

    ``rewards`` must hold the whole generation batch (all processes) for ``"batch"`` to match TRL.
    NaN advantages (unscorable completion, or ``σ`` undefined) become 0.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    advantages = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    std = reward_std(rewards, group_size, scale_rewards)
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def reward_std(rewards: Tensor, group_size: int, scale_rewards: ScaleRewards = "group") -> Tensor:
    """The ``σ`` of :func:`group_advantages`, one value per completion.

    Per-group std for ``"group"`` and ``"none"`` (TRL computes it for ``"none"`` too, to log
    ``frac_reward_zero_std = mean(isclose(σ, 0))``); whole-batch std for ``"batch"``.
    """
    if scale_rewards in ("group", "none"):
        return _group_std(rewards.view(-1, group_size), group_size)
    if scale_rewards == "batch":
        return (nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)).expand_as(rewards)
    raise ValueError(f"scale_rewards must be one of 'group', 'batch', 'none'; got {scale_rewards!r}")


def _group_std(grouped: Tensor, group_size: int) -> Tensor:
    """Per-group unbiased std, repeated to one value per completion (0 when ``G == 1``)."""
    if group_size == 1:
        return torch.zeros(grouped.numel(), dtype=grouped.dtype, device=grouped.device)
    return nanstd(grouped, dim=1).repeat_interleave(group_size)
