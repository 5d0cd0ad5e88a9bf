"""Routed experts of which only some train: the ESFT layout of one MoE layer's stacked experts.

Design (ESFT, align/train/esft.py): the chosen experts' slices are split off into parameters of their
own, `tuned_gate_up_proj` [S, 2I, H] and `tuned_down_proj` [S, H, I]; the stacked `gate_up_proj` /
`down_proj` [E, ...] stay in place, frozen (requires_grad False). So gradients, AdamW state and the DDP
all-reduce exist for the S chosen slices only, and nothing outside them can change. The stacked tensors
always hold every expert's current weights: `sync_()` writes the tuned slices back into them after each
optimizer step (the setup hooks it on the optimizer), so saving, evaluation and generation use the
plain stacked weights, and the hub-layout checkpoint is the stacked state dict without the `tuned_*`
keys.

A forward with autograd sorts the routed slots once with the chosen experts first (`order`: the chosen
experts in `tuned_ids` order, then the others by id), runs the chosen rows through the grouped GEMM
with the tuned parameters and the other rows with the frozen stacked tensors (the chosen experts own
no rows there), and combines each token's k rows as the fused path does. Every slot is computed once.
Without autograd the stacked tensors run the model's own path (`routed_experts`).
"""

from __future__ import annotations

import torch
from torch import nn

from align.kernels.moe_experts import (
    combine_reference,
    expert_mlp_reference,
    routed_experts,
    sort_by_expert_reference,
)
from align.models.moe import Experts


class SlicedExperts(nn.Module):
    """An Experts module whose experts `tuned_ids` train as parameters of their own."""

    def __init__(self, experts: Experts, tuned_ids: list[int]):
        super().__init__()
        n = experts.gate_up_proj.shape[0]
        if not tuned_ids or len(set(tuned_ids)) != len(tuned_ids) or not all(0 <= e < n for e in tuned_ids):
            raise ValueError(f"tuned expert ids {tuned_ids}: expected distinct ids in [0, {n})")
        self.gate_up_proj = experts.gate_up_proj.requires_grad_(False)
        self.down_proj = experts.down_proj.requires_grad_(False)
        ids = torch.tensor(tuned_ids, dtype=torch.long, device=self.gate_up_proj.device)
        self.tuned_gate_up_proj = nn.Parameter(self.gate_up_proj.detach()[ids].clone())
        self.tuned_down_proj = nn.Parameter(self.down_proj.detach()[ids].clone())
        rest = [e for e in range(n) if e not in set(tuned_ids)]
        order = torch.tensor(list(tuned_ids) + rest, dtype=torch.long, device=ids.device)  # sort rank -> expert
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=ids.device))  # expert -> rank
        self.register_buffer("tuned_ids", ids, persistent=False)
        self.register_buffer("rank", rank, persistent=False)

    @property
    def n_tuned(self) -> int:
        return self.tuned_ids.numel()

    @torch.no_grad()
    def sync_(self) -> None:
        """Write the tuned slices into the stacked tensors (after an optimizer step, or a load)."""
        self.gate_up_proj.index_copy_(0, self.tuned_ids, self.tuned_gate_up_proj.to(self.gate_up_proj.dtype))
        self.down_proj.index_copy_(0, self.tuned_ids, self.tuned_down_proj.to(self.down_proj.dtype))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/experts [T, k] -> [T, H], as Experts.forward."""
        if not (torch.is_grad_enabled() and self.tuned_gate_up_proj.requires_grad):
            return routed_experts(x, weights, experts, self.gate_up_proj, self.down_proj)
        n, s = self.rank.numel(), self.n_tuned
        source, position, ends = sort_by_expert_reference(self.rank[experts], n)  # chosen experts' rows first
        split = int(ends[s - 1])  # rows of the chosen experts (one host sync)
        tuned = expert_mlp_reference(x, source[:split], ends[:s], self.tuned_gate_up_proj, self.tuned_down_proj)
        if split == 0:  # no row for any chosen expert: keep the parameters in the graph (DDP expects a gradient)
            tuned = tuned + 0.0 * (self.tuned_gate_up_proj.sum() + self.tuned_down_proj.sum())
        frozen_ends = self._frozen_ends(ends, split)
        frozen = expert_mlp_reference(x, source[split:], frozen_ends, self.gate_up_proj, self.down_proj)
        return combine_reference(torch.cat([tuned, frozen]), position, weights).to(x.dtype)

    def _frozen_ends(self, ends: torch.Tensor, split: int) -> torch.Tensor:
        """Cumulative rows per expert id (chosen experts own none) of the rows after `split`."""
        counts = torch.diff(ends.long(), prepend=ends.new_zeros(1).long())  # [E] by sort rank
        by_expert = counts[self.rank]  # [E] by expert id
        by_expert = by_expert.index_fill(0, self.tuned_ids, 0)
        return torch.cumsum(by_expert, 0).to(torch.int32)


def slice_experts(model: nn.Module, chosen: dict[int, list[int]]) -> dict[int, SlicedExperts]:
    """Replace the routed experts of each decoder layer index in `chosen` by a SlicedExperts training
    those expert ids; returns them by layer."""
    layers = model.model.layers
    out = {}
    for index, ids in sorted(chosen.items()):
        mlp = layers[index].mlp if 0 <= index < len(layers) else None
        if not isinstance(getattr(mlp, "experts", None), Experts):
            raise ValueError(f"layer {index}: not a MoE layer with routed experts (or out of range)")
        mlp.experts = out[index] = SlicedExperts(mlp.experts, ids)
    return out
