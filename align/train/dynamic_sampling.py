"""DAPO's dynamic sampling (grpo.dynamic_sampling): a group whose rewards are all equal has zero
advantage and teaches nothing, so it is dropped and more prompts are generated until the step holds
`prompts_per_step` informative groups, within `max_sampling_rounds` extra rounds (then the step trains
on the informative groups it has; with none at all, on its first round, whose advantages are all 0).

Whether to sample another round is one decision every process takes together (`agree`: one
all-reduce of "this rank still lacks groups"), so no process waits alone in a collective; the extra
rounds' prompts and seeds are pure functions of (seed, step, round), as the first round's are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Batch = TypeVar("Batch")


def informative_groups(reward: torch.Tensor, group: int) -> list[int]:
    """Indices of the groups (consecutive `group` rows) whose scored rewards are not all equal (NaN = unscored)."""
    rows = reward.view(-1, group)
    scored = ~torch.isnan(rows)
    high = torch.where(scored, rows, float("-inf")).max(-1).values
    low = torch.where(scored, rows, float("inf")).min(-1).values
    return torch.nonzero(high > low).flatten().tolist()


def agree(more: bool, accelerator) -> bool:
    """True when any process wants another round: one all-reduce (max) with several processes."""
    if accelerator is None or accelerator.num_processes == 1:
        return more
    flag = torch.tensor([float(more)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item())


def fill_groups(
    first: tuple[Batch, torch.Tensor], sample: Callable[[int], tuple[Batch, torch.Tensor]],
    take: Callable[[list[tuple[Batch, list[int]]]], Batch], target: int, group: int, max_rounds: int,
    accelerator=None,
) -> tuple[Batch, torch.Tensor, dict[str, float]]:
    """(rollout, reward) of `target` informative groups (fewer when the rounds run out).

    first: the step's round (rollout, reward per row); sample(r): extra round r >= 1; take([(rollout,
    group indices), ...]): the rows of those groups, in order, as one rollout."""
    rounds = [first]
    kept = [informative_groups(first[1], group)]
    while agree(sum(map(len, kept)) < target and len(rounds) <= max_rounds, accelerator):
        rounds.append(sample(len(rounds)))
        kept.append(informative_groups(rounds[-1][1], group))
    chosen, left = [], target
    for (batch, reward), groups in zip(rounds, kept, strict=True):
        chosen.append((batch, reward, groups[:left]))
        left -= len(chosen[-1][2])
    if left == target:  # nothing informative at all: the first round, advantages 0
        chosen = [(first[0], first[1], list(range(len(first[1]) // group)))]
    reward = torch.cat([r[torch.cat(rows_of(groups, group))] for _, r, groups in chosen if groups])
    dropped = sum(len(r) // group - len(k) for (_, r), k in zip(rounds, kept, strict=True))
    stats = {"sampling/extra_rounds": float(len(rounds) - 1), "sampling/informative_groups": float(target - left),
             "sampling/dropped_groups": float(dropped)}
    return take([(b, groups) for b, _, groups in chosen if groups]), reward, stats


def rows_of(groups: list[int], group: int) -> list[torch.Tensor]:
    """Row indices of the groups, one tensor per group."""
    return [torch.arange(g * group, (g + 1) * group) for g in groups]
