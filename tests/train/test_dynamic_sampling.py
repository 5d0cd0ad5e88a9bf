"""DAPO dynamic sampling (align.train.dynamic_sampling) and its place in `align rl`."""

from __future__ import annotations

import math

import torch

from align.train import grpo
from align.train.dynamic_sampling import fill_groups, informative_groups
from align.train.metrics import read_metrics
from align.train.order import DataOrder
from tests.train.test_grpo import recipe

G = 2
nan = math.nan


def test_informative_groups_by_hand():
    reward = torch.tensor([1.0, 1.0, 0.0, 1.0, nan, 2.0, nan, nan, 3.0, 3.0])
    assert informative_groups(reward, G) == [1]  # equal, differ, one scored, none scored, equal


def rounds_of(*groups: list[bool]):
    """Fake rounds: group i informative -> rewards (0, 1), else (1, 1); the 'rollout' is the round index."""
    return [(r, torch.tensor([v for inf in g for v in ((0.0, 1.0) if inf else (1.0, 1.0))]))
            for r, g in enumerate(groups)]


def run(rounds, target, max_rounds, accelerator=None):
    sampled = []

    def sample(r):
        sampled.append(r)
        return rounds[r]

    taken = []
    out = fill_groups(rounds[0], sample, lambda parts: taken.append(parts) or parts, target, G, max_rounds,
                      accelerator)
    return out, sampled


def test_extra_rounds_fill_the_batch_and_stop_when_full():
    rounds = rounds_of([True, False, True, False], [False, True, False, False], [True, True, True, False])
    (parts, reward, stats), sampled = run(rounds, target=4, max_rounds=5)
    assert sampled == [1, 2]
    assert parts == [(0, [0, 2]), (1, [1]), (2, [0])]
    assert reward.tolist() == [0.0, 1.0] * 4
    assert stats == {"sampling/extra_rounds": 2.0, "sampling/informative_groups": 4.0, "sampling/dropped_groups": 6.0}


def test_rounds_are_bounded_and_nothing_informative_keeps_the_first_round():
    rounds = rounds_of([True, False], [False, False], [True, True])
    (parts, _, stats), sampled = run(rounds, target=2, max_rounds=1)
    assert sampled == [1] and parts == [(0, [0])] and stats["sampling/informative_groups"] == 1.0
    rounds = rounds_of([False, False], [False, False])
    (parts, reward, stats), _ = run(rounds, target=2, max_rounds=1)
    assert parts == [(0, [0, 1])] and reward.tolist() == [1.0] * 4 and stats["sampling/informative_groups"] == 0


class TwoRanks:
    """An accelerator of two processes whose other rank still lacks groups for `other` more decisions."""

    num_processes, device = 2, "cpu"

    def __init__(self, other: int):
        self.other, self.reductions = other, 0

    def reduce(self, flag, reduction):
        assert reduction == "max"
        self.reductions += 1
        return torch.maximum(flag, torch.tensor([float(self.reductions <= self.other)]))


def test_every_rank_takes_the_same_number_of_rounds():
    rounds = rounds_of([True, True], [True, True], [True, True], [True, True])
    ranks = TwoRanks(other=2)
    (_, _, stats), sampled = run(rounds, target=2, max_rounds=3, accelerator=ranks)
    assert sampled == [1, 2]  # this rank was full after round 0 but follows the other one
    assert ranks.reductions == 3  # one all-reduce per decision


def test_extra_rows_are_a_pure_function_of_seed_step_and_round():
    order = DataOrder(50, seed=3, rows_per_step=8)
    assert order.extra_rows(4, 1) == DataOrder(50, seed=3, rows_per_step=8).extra_rows(4, 1)
    assert order.extra_rows(4, 1) != order.extra_rows(4, 2) and len(set(order.extra_rows(4, 1))) == 8


def test_rl_run_with_dynamic_sampling(tmp_path):
    grpo.run_rl(recipe(tmp_path / "run", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2",
                       "train.log_every=1"))
    steps = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert 0 <= record["sampling/extra_rounds"] <= 2
        assert record["sampling/informative_groups"] <= 4 and "time/dynamic_sampling" in record
