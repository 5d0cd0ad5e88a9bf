"""DeepSeekMoE: shared experts + routed experts stored stacked, run as grouped matrix products.

Routing (per token, in float32):
- scores: softmax (V2) or sigmoid (V3) of the gate logits;
- selection: `greedy` top-k; `group_limited_greedy` keeps the `topk_group` groups with the highest
  max score, then top-k; `noaux_tc` adds `e_score_correction_bias` for the choice only, ranks groups
  by the sum of their two best biased scores, then top-k;
- weights: the chosen (unbiased) scores; DeepSeek-V2 divides them by their sum when `norm_topk_prob`,
  else multiplies them by `routed_scaling_factor` (one or the other); V3 normalises (when
  `norm_topk_prob`), then scales (config.routing_weight_rule).
The expert-level balance loss (DeepSeek-V2 §2.2, `aux_loss_alpha`, per sequence when `seq_aux`) is
computed in training mode and returned beside the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from align.kernels.moe_experts import expert_mlp, expert_mlp_reference, fused_experts_available
from align.kernels.moe_route import (
    combine,
    combine_reference,
    fused_route_available,
    greedy_gate,
    sort_by_expert,
    sort_by_expert_reference,
)
from align.models.config import num_groups, routing_weight_rule, scoring_func, topk_method


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.scoring, self.method = scoring_func(config), topk_method(config)
        self.n_group = num_groups(config)
        self.topk_group = config.topk_group or self.n_group
        self.normalise, self.scale = routing_weight_rule(config)
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def forward(
        self, x: torch.Tensor, need_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, H] -> (weights [T, k] fp32, experts [T, k] int64, scores [T, E] fp32 or None).

        Greedy softmax routing without autograd on CUDA (the decode step) is one Triton launch that
        returns scores None; need_scores (the balance loss wants them) keeps the torch path.
        """
        if not need_scores and self._fused(x):
            return (*greedy_gate(x, self.weight, self.top_k, self.normalise, self.scale), None)
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
        if self.method != "greedy":
            choice = self._mask_groups(choice)
        experts = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, experts)
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, experts, scores

    def _fused(self, x: torch.Tensor) -> bool:
        plain = self.method == "greedy" and self.scoring == "softmax" and x.dtype == self.weight.dtype
        return plain and fused_route_available(x, x.shape[0] * self.top_k)

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # [T, G, E/G]
        if self.method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            fill = float("-inf")
        else:
            group_score = grouped.max(-1).values
            fill = 0.0
        keep = torch.topk(group_score, self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], fill).view_as(choice)


class Experts(nn.Module):
    """Routed experts, stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, config):
        super().__init__()
        n, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(n, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/experts [T, k] -> sum_k weight * expert_k(x), [T, H].

        No host synchronisation on the grouped-GEMM path (so the decode step can be CUDA-graph
        captured), and each token's k outputs summed in a fixed order instead of float atomics, so
        results repeat bit for bit. Without autograd on CUDA (decode), routing, the expert MLP and
        combining are Triton launches (align/kernels/moe_route.py, moe_experts.py).
        """
        fused = fused_route_available(x, experts.numel())
        sort = sort_by_expert if fused else sort_by_expert_reference
        source, position, ends = sort(experts, self.gate_up_proj.shape[0])
        mlp = expert_mlp if fused_experts_available(x, self.gate_up_proj) else expert_mlp_reference
        out = mlp(x, source, ends, self.gate_up_proj, self.down_proj)  # [T*k, H], sorted by expert
        return (combine if fused else combine_reference)(out, position, weights).to(x.dtype)


def balance_loss(
    scores: torch.Tensor, experts: torch.Tensor, batch: int, alpha: float, seq_aux: bool,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert-level balance loss: alpha * sum_e f_e * P_e (DeepSeek-V2 eq. 23).

    f_e = E / (k * T) * (tokens routed to e), P_e = mean score of e over the T tokens; per sequence
    (then averaged over sequences) when seq_aux, else over the whole batch. Masked tokens are left out.
    scores [B*S, E], experts [B*S, k], token_mask [B, S] or None.
    """
    n_experts, k = scores.shape[1], experts.shape[1]
    mask = scores.new_ones(scores.shape[0]) if token_mask is None else token_mask.reshape(-1).to(scores.dtype)
    hits = F.one_hot(experts, n_experts).to(scores.dtype).sum(1) * mask[:, None]  # [B*S, E]
    weighted = scores * mask[:, None]
    if seq_aux:
        hits, weighted, mask = (t.view(batch, -1, *t.shape[1:]) for t in (hits, weighted, mask))
        count = mask.sum(1).clamp(min=1)[:, None]  # [B, 1]
        f = hits.sum(1) * n_experts / (k * count)  # [B, E]
        p = weighted.sum(1) / count
        return alpha * (f * p).sum(-1).mean()
    count = mask.sum().clamp(min=1)
    f = hits.sum(0) * n_experts / (k * count)
    return alpha * (f * weighted.sum(0) / count).sum()


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
        self.aux_alpha = float(getattr(config, "aux_loss_alpha", 0.0) or 0.0)
        self.seq_aux = bool(getattr(config, "seq_aux", True))

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, S, H] -> (out [B, S, H], balance loss or None)."""
        flat = x.reshape(-1, x.shape[-1])  # [B*S, H]
        want_aux = self.training and self.aux_alpha > 0
        weights, experts, scores = self.gate(flat, need_scores=want_aux)
        out = self.experts(flat, weights, experts).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = None
        if want_aux:
            aux = balance_loss(scores, experts, x.shape[0], self.aux_alpha, self.seq_aux, token_mask)
        return out, aux
