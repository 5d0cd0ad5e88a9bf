"""MoE token routing around the grouped expert GEMMs: choose experts, sort routed slots by expert,
and combine.

`greedy_gate(x, weight, top_k, normalise, scale)` is the gate of DeepSeek-V2 (-Lite) with
plain greedy selection: float32 logits, softmax, the top_k experts, their scores (normalised to
sum 1 when normalise) times scale -> (weights [T, k] float32, experts [T, k] int64). The caller's
model family picks both (DeepSeek-V2 with norm_topk_prob: (True, 1.0); without: (False,
routed_scaling_factor)).

`sort_by_expert(experts [T, k], n_experts)` gives, for the T*k routed slots (token t's j-th choice
is slot t*k + j), a stable order grouped by expert:
- `source` [T*k]: the token each sorted row reads (the rows to gather for the grouped GEMM);
- `position` [T, k]: the sorted row of each slot (where its expert output lands);
- `ends` [E] int32: the end row of each expert's block (the grouped GEMM's offsets).
`combine(out, position, weights)` sums each token's k expert outputs, weighted: [T, H].

The references are plain PyTorch (stable argsort; gather, scale, sum). The Triton kernels serve the
decode step, where T is small and the torch path is a dozen launches including a radix sort: one
program counts and ranks all slots; the combine reads each token's k rows once. No backward:
training keeps the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.dispatch import pow2_block, require_contiguous_last_dim, triton_ready

SORT_MAX_SLOTS = 8192  # one program ranks every slot; beyond this the torch sort is the better tool


# ----------------------------------------------------------------------------- references
def greedy_gate_reference(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] -> (weights [T, k] float32, experts [T, k] int64), best first."""
    scores = F.linear(x.float(), weight.float()).softmax(-1)  # [T, E]
    weights, experts = torch.topk(scores, top_k, dim=-1)
    if normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, experts


def sort_by_expert_reference(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    """experts [T, k] int -> (source [T*k] int64, position [T, k] int64, ends [E] int32)."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k] slot of each sorted row
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # [E], no host sync (unlike bincount on CUDA)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    return order // k, position.view(tokens, k), torch.cumsum(counts, 0, dtype=torch.int32)


def combine_reference(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T*k, H] sorted rows, position/weights [T, k] -> sum_j weights[t, j] * out[position[t, j]], [T, H].

    Products in out's dtype, summed in a fixed order (no atomics), so results repeat bit for bit.
    """
    gathered = out[position.reshape(-1)].view(*position.shape, -1)  # [T, k, H]
    return (gathered * weights[..., None].to(out.dtype)).sum(1)


# ----------------------------------------------------------------------------- launchers
def greedy_gate(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As greedy_gate_reference, in one launch (16 tokens per program)."""
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


def sort_by_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    """As sort_by_expert_reference, in one single-program launch (up to SORT_MAX_SLOTS slots)."""
    from align.kernels import moe_route_triton  # Triton only where the kernels run

    tokens, k = experts.shape
    if tokens * k > SORT_MAX_SLOTS:
        raise ValueError(f"sort_by_expert takes at most {SORT_MAX_SLOTS} routed slots, got {tokens * k}")
    flat = experts.reshape(-1).contiguous()
    source = torch.empty(tokens * k, dtype=torch.long, device=flat.device)
    position = torch.empty(tokens * k, dtype=torch.long, device=flat.device)
    ends = torch.empty(n_experts, dtype=torch.int32, device=flat.device)
    moe_route_triton.sort_kernel[(1,)](  # 128-slot blocks, 4 warps: fastest at 384 slots (tune_decode_kernels.py)
        flat, source, position, ends, tokens * k, k, n_experts, BLOCK_N=128, BLOCK_E=pow2_block(n_experts), num_warps=4
    )
    return source, position.view(tokens, k), ends


def combine(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """As combine_reference; one program per (token, block of H)."""
    import triton

    from align.kernels import moe_route_triton  # Triton only where the kernels run

    require_contiguous_last_dim("combine", out=out)
    tokens, k = position.shape
    hidden = out.shape[1]
    result = torch.empty(tokens, hidden, dtype=out.dtype, device=out.device)
    block = 1024
    moe_route_triton.combine_kernel[(tokens, triton.cdiv(hidden, block))](
        out, out.stride(0), position.contiguous(), weights.contiguous(), result, hidden,
        K=k, BLOCK_H=block,
    )
    return result


def fused_route_available(x: torch.Tensor, slots: int) -> bool:
    """Whether the Triton gate/sort/combine serve this call: CUDA, no autograd, at most SORT_MAX_SLOTS slots."""
    if torch.is_grad_enabled() or slots > SORT_MAX_SLOTS:
        return False
    return triton_ready(x)
