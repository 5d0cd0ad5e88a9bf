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

The routing API every routing feature builds on: `Gate.forward(x, with_scores, experts)` returns a
`Routing` (weights, experts, scores) in any mode, with or without autograd; `with_scores` always
yields the gate scores, `experts` forces the choice (routing replay; any integer dtype, a row of -1 =
choose by itself) and weighs it from the current scores; `Routing.load` counts tokens per expert. A
`RoutingTrace` passed to the model's forward (or its prefill / decode) records every MoE layer's
Routing and replays forced ids per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from align.kernels.moe_experts import routed_experts
from align.kernels.moe_route import greedy_gate, routing_weights
from align.kernels.swiglu import swiglu
from align.models.config import num_groups, routing_weight_rule, scoring_func, topk_method


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Routing(NamedTuple):
    """One MoE layer's routing of T tokens."""

    weights: torch.Tensor  # [T, k] float32, the combine weights
    experts: torch.Tensor  # [T, k] int64
    scores: torch.Tensor | None  # [T, E] float32 gate scores; None only from the fast gate (not asked for)

    def load(self, n_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens routed to each expert, [E] int64: sums to T * k over the tokens token_mask (any
        shape with T elements, nonzero = counted) keeps. No host synchronisation."""
        hits = torch.ones_like(self.experts)
        if token_mask is not None:
            hits = hits * token_mask.reshape(-1, 1).to(hits.dtype)  # [T, k]
        counts = torch.zeros(n_experts, dtype=torch.long, device=self.experts.device)
        return counts.index_add_(0, self.experts.reshape(-1), hits.reshape(-1))  # [T*k] slots into [E]


class RoutingTrace:
    """What one forward's MoE layers routed, and the expert ids to force on them (routing replay).

    Pass as `routing=` to the model's forward. replay: MoE layer index -> experts [B*S, k] (e.g. a
    previous trace's `experts()`; rows of -1: the gate chooses); with_scores: compute every layer's
    gate scores; own_choice: also record what each layer would pick by itself (`own`), replay or not. After the
    forward, `layers[i]` is MoE layer i's Routing, detached (a layer re-run by gradient checkpointing
    records the same routing again).
    """

    def __init__(
        self, replay: dict[int, torch.Tensor] | None = None, with_scores: bool = False, own_choice: bool = False
    ):
        self.replay = dict(replay or {})
        self.with_scores = with_scores or own_choice
        self.own_choice = own_choice
        self.layers: dict[int, Routing] = {}
        self.own: dict[int, torch.Tensor] = {}  # own_choice: the experts each layer picks by itself [B*S, k]

    def record(self, layer: int, routing: Routing, own: torch.Tensor | None = None) -> None:
        self.layers[layer] = Routing(*(None if t is None else t.detach() for t in routing))
        if own is not None:
            self.own[layer] = own

    def experts(self) -> dict[int, torch.Tensor]:
        """Layer index -> the experts it used [B*S, k]: a replay for a later forward."""
        return {layer: routing.experts for layer, routing in self.layers.items()}

    def load(self, n_experts: int, token_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Layer index -> tokens per expert [E] int64 (Routing.load)."""
        return {layer: routing.load(n_experts, token_mask) for layer, routing in self.layers.items()}


@torch.compiler.disable
def _record_outside_graph(trace: RoutingTrace, layer: int, routing: Routing, own: torch.Tensor | None) -> None:
    """RoutingTrace.record from a compiled layer (train.compile), run eagerly: the layer's graphs never
    guard on what the trace holds, so a checkpointed layer's recompute runs the graph its forward ran
    (else the recompute recompiles and saves other tensors: torch.utils.checkpoint's CheckpointError)."""
    trace.record(layer, routing, own)


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
        self, x: torch.Tensor, with_scores: bool = False, experts: torch.Tensor | None = None
    ) -> Routing:
        """x [T, H] -> Routing: weights [T, k] fp32, experts [T, k] int64, scores [T, E] fp32 or None.

        with_scores: always return the scores (else plain greedy softmax gating may skip them, one
        Triton launch in the decode step). experts [T, k] (any integer dtype): use these instead of
        choosing (routing replay), except rows whose first id is negative, which choose by themselves;
        the weights come from the current scores by the family's rule.
        """
        plain = self.method == "greedy" and self.scoring == "softmax"
        if plain and experts is None and not with_scores:
            return Routing(*greedy_gate(x, self.weight, self.top_k, self.normalise, self.scale), None)
        scores = self.scores(x)
        if experts is not None:
            if experts.shape != (x.shape[0], self.top_k):
                raise ValueError(
                    f"forced experts have shape {tuple(experts.shape)}; this gate routes {x.shape[0]} tokens "
                    f"to {self.top_k} experts each: expected ({x.shape[0]}, {self.top_k})"
                )
            own = self.choose(scores)
            experts = torch.where(experts[:, :1] >= 0, experts.long(), own)  # no host read: rows of -1 choose
            return Routing(routing_weights(scores, experts, self.normalise, self.scale), experts, scores)
        experts = self.choose(scores)
        return Routing(routing_weights(scores, experts, self.normalise, self.scale), experts, scores)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The experts this gate picks from its scores [T, E] (bias, group limit, top-k) -> [T, k] int64."""
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
        if self.method != "greedy":
            choice = self._mask_groups(choice)
        return torch.topk(choice, self.top_k, dim=-1, sorted=False).indices  # as kernels.moe_route.top_k_routing

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> gate scores [T, E] in float32 (softmax or sigmoid of the logits)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()

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
        """x [T, H], weights/experts [T, k] -> sum_k weight * expert_k(x), [T, H] (align/kernels/moe_experts.py).

        Called as a module so that adapters on the stacked weights (PEFT target_parameters) apply.
        """
        return routed_experts(x, weights, experts, self.gate_up_proj, self.down_proj)


def expert_hits(experts: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """experts [T, k] -> [T, E]: how many of each token's k choices are expert e. A scatter-add, not
    F.one_hot, which checks the ids' range on the host (two GPU syncs per call)."""
    hits = torch.zeros(experts.shape[0], n_experts, dtype=dtype, device=experts.device)
    return hits.scatter_add_(1, experts, torch.ones(experts.shape, dtype=dtype, device=experts.device))


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
    hits = expert_hits(experts, n_experts, scores.dtype) * mask[:, None]  # [B*S, E]
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
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Gate(config)
        self.experts = Experts(config)
        shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
        self.aux_alpha = float(getattr(config, "aux_loss_alpha", 0.0) or 0.0)
        self.seq_aux = bool(getattr(config, "seq_aux", True))

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, trace: RoutingTrace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, S, H] -> (out [B, S, H], balance loss or None); trace: forced ids in, routing out."""
        flat = x.reshape(-1, x.shape[-1])  # [B*S, H]
        want_aux = self.training and self.aux_alpha > 0
        forced = None if trace is None else trace.replay.get(self.layer_idx)
        with_scores = want_aux or (trace is not None and trace.with_scores)
        routing = self.gate(flat, with_scores=with_scores, experts=forced)
        if trace is not None:
            own = None
            if trace.own_choice:  # without replay the gate's choice is its own
                own = routing.experts if forced is None else self.gate.choose(routing.scores.detach())
            record = _record_outside_graph if torch.compiler.is_compiling() else RoutingTrace.record
            record(trace, self.layer_idx, routing, own)  # eager (decode graphs capture it): the plain method
        out = self.experts(flat, routing.weights, routing.experts).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = None
        if want_aux:
            aux = balance_loss(routing.scores, routing.experts, x.shape[0], self.aux_alpha, self.seq_aux, token_mask)
        return out, aux
