"""The plain MoE gate: choose each token's experts and their weights.

`greedy_gate(x, weight, top_k, normalise, scale)` is the gate of DeepSeek-V2 (-Lite) with plain
greedy selection: float32 logits, softmax, the top_k experts, their scores (normalised to sum 1
when normalise) times scale -> (weights [T, k] float32, experts [T, k] int64). The caller's model
family picks both (DeepSeek-V2 with norm_topk_prob: (True, 1.0); without: (False,
routed_scaling_factor)). The order of a token's k experts is unspecified (the kernel gives best
first, the reference torch.topk's unsorted order).

On CUDA without autograd, for at most SORT_MAX_SLOTS routed slots, one Triton launch computes it
(the decode step, where T is small and the torch form is a handful of launches); elsewhere the
reference, whose pieces (`top_k_routing`) the model's general gate shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.dispatch import kernel_path, pow2_block, require_contiguous_last_dim

SORT_MAX_SLOTS = 8192  # one program ranks every routed slot (moe_experts.py); the gate kernel keeps the same bound


def greedy_gate(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] -> (weights [T, k] float32, experts [T, k] int64)."""
    fits = x.dtype == weight.dtype and x.shape[0] * top_k <= SORT_MAX_SLOTS
    if fits and kernel_path(x, weight):
        return _greedy_gate_triton(x, weight, top_k, normalise, scale)
    return greedy_gate_reference(x, weight, top_k, normalise, scale)


def routing_weights(scores: torch.Tensor, experts: torch.Tensor, normalise: bool, scale: float) -> torch.Tensor:
    """scores [T, E], experts [T, k] -> the chosen scores [T, k], normalised to sum 1 if asked, times scale."""
    weights = scores.gather(1, experts)
    if normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale


def top_k_routing(
    scores: torch.Tensor, choice: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_k experts by `choice` [T, E] (the scores, or biased / group-masked scores), weighted
    from `scores` [T, E] -> (weights [T, k], experts [T, k])."""
    experts = torch.topk(choice, top_k, dim=-1, sorted=False).indices  # [T, k]
    return routing_weights(scores, experts, normalise, scale), experts


def greedy_gate_reference(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As greedy_gate, in PyTorch."""
    scores = F.linear(x.float(), weight.float()).softmax(-1)  # [T, E]
    return top_k_routing(scores, scores, top_k, normalise, scale)


def _greedy_gate_triton(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As greedy_gate, in one launch (16 tokens per program), best expert first."""
    import triton

    from align.kernels import moe_route_triton  # Triton only where the kernels run

    tokens, hidden = x.shape
    require_contiguous_last_dim("greedy_gate", x=x, weight=weight)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    experts = torch.empty(tokens, top_k, dtype=torch.long, device=x.device)
    block_t = 16
    moe_route_triton.greedy_gate_kernel[(triton.cdiv(tokens, block_t),)](
        x, x.stride(0), weight, weight.stride(0), weights, experts, tokens, hidden, weight.shape[0],
        float(scale), K=top_k, NORM=bool(normalise), BLOCK_T=block_t,
        BLOCK_E=pow2_block(weight.shape[0]), BLOCK_H=256, num_warps=4,
    )
    return weights, experts
