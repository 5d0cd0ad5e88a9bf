"""Which rows a training step takes: a pure function of (seed, step), so a resumed run continues exactly.

The rows of epoch e are shuffled by a generator seeded with (seed, e), and step k takes stream positions
[k*G, (k+1)*G) of the concatenated epochs (G = rows per step).
"""

from __future__ import annotations

import torch


class DataOrder:
    """Row indices of step k: a deterministic function of (seed, k)."""

    def __init__(self, n_rows: int, seed: int, rows_per_step: int):
        self.n, self.seed, self.per_step = n_rows, seed, rows_per_step
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._perms[epoch]

    def step_rows(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + self.per_step)]

    def extra_rows(self, step: int, round_: int) -> list[int]:
        """Rows of extra round `round_` >= 1 of step k (dynamic sampling): a seeded draw without replacement."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + round_)
        return torch.randperm(self.n, generator=generator)[: self.per_step].tolist()


def local_micro_batches(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of a step: micro-batch m of rank r is the (m * world + r)-th slice."""
    accum = len(indices) // (world * micro)
    return [indices[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)]
