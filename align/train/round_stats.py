"""What a GRPO round logs and trains on that needs every process's rows: the reward metrics, the advantages
(scale_rewards=batch divides by the std of the whole round), and the advantage / completion statistics.
`gather` (align.train.data_parallel.gatherer) joins the processes' lists; with one process it is `list`.
"""

from __future__ import annotations

import torch

from align.recipe import RLRecipe
from align.train import guards
from align.train.advantages import group_advantages, reward_std
from align.train.data_parallel import Gather


def reward_summary(parts: list[tuple[list, dict, dict]]) -> tuple[dict, str | None]:
    """Reward metrics and failure of the (totals, per-function scores, errors) of every process."""
    from rewards import reward_metrics

    totals = [v for t, _, _ in parts for v in t]
    per_function = {name: [v for _, f, _ in parts for v in f[name]] for name in parts[0][1]}
    errors = {name: max(e[name] for _, _, e in parts) for name in parts[0][2]}
    return reward_metrics(per_function, errors, totals), guards.reward_failure(per_function, errors)


def advantage_metrics(reward: torch.Tensor, advantages: torch.Tensor, recipe: RLRecipe) -> dict[str, float]:
    g = recipe.grpo
    std = reward_std(reward, g.num_generations, g.scale_rewards)
    return {"advantages/mean": advantages.mean().item(), "advantages/std": advantages.std().item(),
            "advantages/abs_max": advantages.abs().max().item(),
            "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item()}


def completion_metrics(completion_ids: list[list[int]], finish: list[str], sample_logprobs: list[list[float]],
                       mask: torch.Tensor, gather: Gather = list) -> dict[str, float]:
    """Length, truncation and sampled-token statistics over every process's completions (mask: the loss mask)."""
    masked = (mask.sum(-1) == 0).tolist()
    rows = gather([(len(c), f == "length", m, sum(lp), len(lp))
                   for c, f, m, lp in zip(completion_ids, finish, masked, sample_logprobs, strict=True)])
    lengths = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    n = max(len(rows), 1)
    return {"completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
            "completions/truncated_fraction": sum(r[1] for r in rows) / n,
            "completions/masked_fraction": sum(r[2] for r in rows) / n,  # mean −log p of sampled tokens:
            "completions/sampled_nll": -sum(r[3] for r in rows) / max(sum(r[4] for r in rows), 1)}


def round_advantages(reward: torch.Tensor, recipe: RLRecipe, gather: Gather,
                     rank: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(every process's rewards, (their advantages, this process's)): groups never span processes, but
    scale_rewards=batch divides by the std of the whole round's rewards."""
    g = recipe.grpo
    parts = gather([reward.tolist()])
    start = sum(len(p) for p in parts[:rank])
    everything = torch.tensor([v for p in parts for v in p], dtype=torch.float32)
    advantages = group_advantages(everything, g.num_generations, g.scale_rewards)
    return everything, (advantages, advantages[start : start + len(reward)])
