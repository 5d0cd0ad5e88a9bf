"""The reward-model loss and its pair statistics (TRL's RewardTrainer formulas, trl 1.16).

Per pair: -log sigmoid(r_chosen - r_rejected - margin) (margin 0 without a margin column), plus
center_rewards_coefficient * (r_chosen + r_rejected)^2 when set; the loss of a batch is the mean over
its pairs. Accuracy counts r_chosen > r_rejected (a tie is wrong); margin is mean(r_chosen - r_rejected).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# what pair_sums adds up, in order
SUMS = ("loss", "correct", "margin", "chosen", "chosen_sq", "rejected", "rejected_sq")


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center: float | None = None) -> torch.Tensor:
    """[n] per-pair losses from scores [n] (float32 arithmetic)."""
    chosen, rejected = chosen.float(), rejected.float()
    gap = chosen - rejected if margin is None else chosen - rejected - margin.float()
    loss = -F.logsigmoid(gap)
    if center:
        loss = loss + center * (chosen + rejected) ** 2
    return loss


def pair_sums(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """float64 [len(SUMS)] sums over the pairs (detached): add them over micro-batches and processes."""
    c, r = chosen.detach().double(), rejected.detach().double()
    return torch.stack([losses.detach().double().sum(), (c > r).double().sum(), (c - r).sum(),
                        c.sum(), (c * c).sum(), r.sum(), (r * r).sum()])


def pair_metrics(sums: torch.Tensor, n: int, prefix: str) -> dict[str, float]:
    """{prefix/loss, accuracy, margin, reward_chosen_mean / _std, reward_rejected_mean / _std} from pair_sums."""
    values = dict(zip(SUMS, (sums / max(n, 1)).tolist(), strict=True))
    out = {f"{prefix}/loss": values["loss"], f"{prefix}/accuracy": values["correct"],
           f"{prefix}/margin": values["margin"]}
    for side in ("chosen", "rejected"):
        mean = values[side]
        out[f"{prefix}/reward_{side}_mean"] = mean
        out[f"{prefix}/reward_{side}_std"] = math.sqrt(max(values[f"{side}_sq"] - mean * mean, 0.0))
    return out
