"""Routed experts of a MoE layer: sort the routed slots by expert, run each expert's SwiGLU MLP on
its rows, and combine each token's k outputs, weighted.

`routed_experts(x, weights, experts, gate_up_proj, down_proj)` computes, for x [T, H] and the
gate's weights / experts [T, k], sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) -> [T, H], with
the layouts of align/models/moe.py (gate_up_proj [E, 2I, H], gate rows first; down_proj [E, H, I]).
Steps:
- sort: for the T*k routed slots (token t's j-th choice is slot t*k + j), a stable order grouped by
  expert: `source` [T*k] (the token each sorted row reads), `position` [T, k] (the sorted row of
  each slot), `ends` [E] int32 (the end row of each expert's block: the grouped GEMM's offsets);
- expert MLP on the sorted rows (each product rounded to the weight dtype before the SwiGLU):
      h[r]   = silu(x[source[r]] @ W_gate[e].T) * (x[source[r]] @ W_up[e].T)     [N, I]
      out[r] = h[r] @ W_down[e].T                                              [N, H]
- combine: each token's k rows, weighted, summed in a fixed order (no atomics), so results repeat
  bit for bit.

No step synchronises with the host, so the decode step can be CUDA-graph captured. Training and
large batches sort and multiply through the references (stable argsort; grouped_linear,
align/kernels/grouped_mm.py; SwiGLU by align/kernels/swiglu.py). On CUDA in 16-bit the combine is
one Triton kernel at every size, reading each token's k rows once, with a backward kernel (one
program per token: the rows' gradients and the routing weights' in one pass) where a gradient flows.
Training with a frozen down_proj (LoRA without routed-expert adapters) takes `ExpertTail` after the
gate_up product instead: SwiGLU, down product and combine in one autograd.Function that keeps only the
gate_up rows, not the [T*k, H] expert outputs (a quarter of a MoE layer's saved activations); its
backward recomputes the SwiGLU inside the kernel that takes the routing weights' gradient.
Without autograd on CUDA the decode sizes also take Triton kernels for the rest: one program counts
and ranks all slots (at most SORT_MAX_SLOTS), and the expert MLP (16-bit, at most MAX_TOKENS tokens)
is two launches, one program per (expert, block of output features): at decode sizes each expert
owns a handful of rows and the grouped GEMM's large row tiles leave bandwidth unused; here the row
tile is as small as the tensor cores allow (16), the token gather happens inside the first kernel,
the SwiGLU inside its epilogue, and an expert without rows reads none of its weights.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import kernel_path, needs_autograd, pow2_block, require_contiguous_last_dim, triton_ready
from align.kernels.grouped_mm import LowRank, grouped_linear
from align.kernels.moe_route import SORT_MAX_SLOTS
from align.kernels.swiglu import swiglu, swiglu_forward

MAX_TOKENS = 512  # beyond this the grouped GEMM's large tiles are the better tool

ExpertUpdates = dict[str, tuple[LowRank, ...]]  # "gate_up_proj" / "down_proj" -> low-rank updates (LoRA)


def routed_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor, updates: ExpertUpdates | None = None,
) -> torch.Tensor:
    """x [T, H], weights [T, k] float32, experts [T, k] int64 -> [T, H] in x's dtype.

    updates: low-rank updates of the stacked weights (split LoRA), applied beside the frozen products."""
    n_experts, updates = gate_up_proj.shape[0], updates or {}
    fused = experts.numel() <= SORT_MAX_SLOTS and kernel_path(x, weights, gate_up_proj, down_proj)
    sort = _sort_by_expert_triton if fused else sort_by_expert_reference
    source, position, ends = sort(experts, n_experts)
    if _tail_fuses(x, weights, gate_up_proj, down_proj, updates):
        gate_up = grouped_linear(x[source], gate_up_proj, ends, updates.get("gate_up_proj", ()))  # [T*k, 2I]
        return ExpertTail.apply(gate_up, down_proj, ends, source, position, weights).to(x.dtype)
    out = _expert_mlp(x, source, ends, gate_up_proj, down_proj, updates)  # [T*k, H], sorted by expert
    return combine(out, position, weights).to(x.dtype)


def _tail_fuses(
    x: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, updates: ExpertUpdates
) -> bool:
    """Whether ExpertTail serves a training call: CUDA, 16-bit, a gradient flowing, down_proj frozen and
    without low-rank updates (its weight gradient would need the [T*k, I] activations ExpertTail drops)."""
    if not (triton_ready(x, half=True) and needs_autograd(x, weights, gate_up_proj)):
        return False
    return down_proj.dtype == x.dtype and not down_proj.requires_grad and _update_count(updates, "down_proj") == 0


def _update_count(updates: ExpertUpdates, name: str | None = None) -> int:
    """How many low-rank updates (of `name`, or of any weight). Counted with len: dynamo (torch 2.11 to 2.13)
    cannot trace `not` on a tuple holding tensors, and a graph break inside a compiled, checkpointed layer is
    what to avoid."""
    return sum(len(v) for key, v in updates.items() if name in (None, key))


def combine(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T*k, H] sorted rows, position/weights [T, k] -> [T, H]: the Triton kernel on CUDA in 16-bit
    (with its backward where a gradient flows: training, the same kernel as prefill and decode), else
    combine_reference."""
    if not triton_ready(out, half=True):
        return combine_reference(out, position, weights)
    if needs_autograd(out, weights):
        return Combine.apply(out, position, weights)
    return _combine_triton(out, position, weights)


def _expert_mlp(
    x: torch.Tensor, source: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    updates: ExpertUpdates,
) -> torch.Tensor:
    """x [T, H], source [N], ends [E] int32 -> [N, H] in x's dtype: the MLP of the sorted rows."""
    same = gate_up_proj.dtype == x.dtype and x.shape[0] <= MAX_TOKENS and _update_count(updates) == 0
    if same and kernel_path(x, gate_up_proj, down_proj, half=True):
        return _expert_mlp_triton(x, source, ends, gate_up_proj, down_proj)
    return expert_mlp_reference(x, source, ends, gate_up_proj, down_proj, updates)


# ----------------------------------------------------------------------------- references
def sort_by_expert_reference(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    """experts [T, k] int -> (source [T*k] int64, position [T, k] int64, ends [E] int32)."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k] slot of each sorted row
    # each expert's end row, by binary search of the sorted ids: no host sync (unlike bincount on CUDA), no
    # atomics or per-call sort (a counting index_add_ is a sort-based index_put under compile, 0.5 ms a layer)
    experts_ids = torch.arange(n_experts, device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(flat[order], experts_ids, right=True).to(torch.int32)  # [E]
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    return order // k, position.view(tokens, k), ends


def expert_mlp_reference(
    x: torch.Tensor, source: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    updates: ExpertUpdates | None = None,
) -> torch.Tensor:
    """As _expert_mlp, through grouped_linear (training, prefill, and wherever the kernel does not run)."""
    updates = updates or {}
    gate_up = grouped_linear(x[source], gate_up_proj, ends, updates.get("gate_up_proj", ()))  # [N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return grouped_linear(swiglu(gate, up), down_proj, ends, updates.get("down_proj", ()))


def combine_reference(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T*k, H] sorted rows, position/weights [T, k] -> sum_j weights[t, j] * out[position[t, j]], [T, H].

    Products in out's dtype, summed in a fixed order (no atomics), so results repeat bit for bit.
    """
    gathered = out[position.reshape(-1)].view(*position.shape, -1)  # [T, k, H]
    return (gathered * weights[..., None].to(out.dtype)).sum(1)


# ----------------------------------------------------------------------------- launchers
def _sort_by_expert_triton(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, ...]:
    """As sort_by_expert_reference, in one single-program launch (up to SORT_MAX_SLOTS slots)."""
    from align.kernels import moe_experts_triton  # Triton only where the kernels run

    tokens, k = experts.shape
    if tokens * k > SORT_MAX_SLOTS:
        raise ValueError(f"sort_by_expert takes at most {SORT_MAX_SLOTS} routed slots, got {tokens * k}")
    flat = experts.reshape(-1).contiguous()  # [T*k]
    source = torch.empty(tokens * k, dtype=torch.long, device=flat.device)
    position = torch.empty(tokens * k, dtype=torch.long, device=flat.device)
    ends = torch.empty(n_experts, dtype=torch.int32, device=flat.device)
    moe_experts_triton.sort_kernel[(1,)](  # 128-slot blocks, 4 warps: fastest at 384 slots (tune_decode_kernels.py)
        flat, source, position, ends, tokens * k, k, n_experts, BLOCK_N=128, BLOCK_E=pow2_block(n_experts), num_warps=4
    )
    return source, position.view(tokens, k), ends


def _combine_triton(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """As combine_reference; one program per (token, block of H)."""
    import triton

    from align.kernels import moe_experts_triton  # Triton only where the kernels run

    require_contiguous_last_dim("combine", out=out)
    tokens, k = position.shape
    hidden = out.shape[1]
    result = torch.empty(tokens, hidden, dtype=out.dtype, device=out.device)
    block = 1024
    moe_experts_triton.combine_kernel[(tokens, triton.cdiv(hidden, block))](
        out, out.stride(0), position.contiguous(), weights.contiguous(), result, hidden,
        K=k, BLOCK_H=block,
    )
    return result


def _combine_backward_triton(
    out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of combine: d_out [T*k, H] in out's dtype, d_weights [T, k] float32; one program per token."""
    from align.kernels import moe_experts_triton  # Triton only where the kernels run

    require_contiguous_last_dim("combine backward", out=out, grad=grad)
    tokens, k = position.shape
    hidden = out.shape[1]
    d_out = torch.empty(out.shape[0], hidden, dtype=out.dtype, device=out.device)
    d_weights = torch.empty(tokens, k, dtype=torch.float32, device=out.device)
    if tokens:
        moe_experts_triton.combine_backward_kernel[(tokens,)](
            out, out.stride(0), position.contiguous(), weights.contiguous(), grad, grad.stride(0), d_out, d_weights,
            hidden, K=k, BLOCK_H=min(pow2_block(hidden), 2048),
        )
    return d_out, d_weights.to(weights.dtype)


class Combine(torch.autograd.Function):
    """combine with a gradient for the expert rows and the routing weights (not for position)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out, position, weights)
        return _combine_triton(out, position, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, position, weights = ctx.saved_tensors
        d_out, d_weights = _combine_backward_triton(out, position, weights, grad.contiguous())
        return d_out, None, d_weights


class ExpertTail(torch.autograd.Function):
    """The routed experts after their gate_up product, for training: SwiGLU, the down product (frozen)
    and the weighted combine, keeping only gate_up [T*k, 2I] for backward where the unfused path keeps
    the expert outputs [T*k, H] too (Combine's saved rows; H > 2I in DeepSeek's MoE layers). The routing
    weights' gradient is taken as sum_i (d_out @ W_down)[r, i] * h[r, i] = sum_h d_out[t, h] * out[r, h],
    with h recomputed from gate_up in the same kernel that runs the SwiGLU backward.
    Reference: combine_reference(expert_mlp_reference(...)) on the same sorted rows."""

    @staticmethod
    def forward(ctx, gate_up, down_proj, ends, source, position, weights):
        gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
        out = grouped_linear(swiglu_forward(gate, up), down_proj, ends)  # [N, H]
        ctx.save_for_backward(gate_up, down_proj, ends, source, position, weights)
        return _combine_triton(out, position, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, down_proj, ends, source, position, weights = ctx.saved_tensors
        d_rows = grouped_linear(grad.contiguous()[source], down_proj.transpose(1, 2), ends)  # [N, I]: d @ W_down
        row_weights = torch.empty(source.shape[0], dtype=weights.dtype, device=weights.device)
        row_weights.scatter_(0, position.reshape(-1), weights.reshape(-1))  # [N]: each sorted row's weight
        d_gate_up, d_row_weights = _expert_tail_backward_triton(gate_up, d_rows, row_weights)
        return d_gate_up, None, None, None, None, d_row_weights[position].to(weights.dtype)


def _expert_tail_backward_triton(
    gate_up: torch.Tensor, d_rows: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [N, 2I], d_rows [N, I] (d_out @ W_down), row_weights [N] -> (d_gate_up [N, 2I] in gate_up's
    dtype, d_row_weights [N] float32); one program per row."""
    from align.kernels import moe_experts_triton  # Triton only where the kernels run

    require_contiguous_last_dim("expert tail backward", gate_up=gate_up, d_rows=d_rows)
    rows, inter = d_rows.shape
    d_gate_up = torch.empty(rows, 2 * inter, dtype=gate_up.dtype, device=gate_up.device)
    d_row_weights = torch.empty(rows, dtype=torch.float32, device=gate_up.device)
    if rows:
        moe_experts_triton.expert_tail_backward_kernel[(rows,)](
            gate_up, gate_up.stride(0), d_rows, d_rows.stride(0), row_weights.contiguous(), d_gate_up,
            d_gate_up.stride(0), d_row_weights, inter, BLOCK=min(pow2_block(inter), 512),
        )
    return d_gate_up, d_row_weights


def _row_block(rows: int, experts: int) -> int:
    """Row tile: twice the mean rows per expert, as a power of two in [16, 64]."""
    want = max(1, 2 * rows // max(experts, 1))
    return min(64, max(16, 1 << (want - 1).bit_length()))


def _expert_mlp_triton(
    x: torch.Tensor, source: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """As _expert_mlp, in two launches; the tile knobs are for bench/tune_decode_kernels.py (defaults:
    the fastest there on the H200 at 128 and 256 rows, V2-Lite shape: 268 / 274 us vs 274 / 306 us for
    the earlier H100 choice, block_k 128 with 4 stages)."""
    import triton

    from align.kernels import moe_experts_triton as kernels  # Triton only where the kernels run

    n_experts, inter2, hidden = gate_up_proj.shape
    inter, rows = inter2 // 2, source.shape[0]
    require_contiguous_last_dim("expert_mlp", x=x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    block_m = _row_block(rows, n_experts)
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    kernels.gate_up_kernel[(n_experts, triton.cdiv(inter, block_n))](
        x, x.stride(0), source, ends, gate_up_proj, gate_up_proj.stride(0), gate_up_proj.stride(1), h,
        inter, hidden, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=hidden % block_k == 0, **launch
    )
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    kernels.down_kernel[(n_experts, triton.cdiv(hidden, block_n))](
        h, ends, down_proj, down_proj.stride(0), down_proj.stride(1), out,
        hidden, inter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=inter % block_k == 0, **launch
    )
    return out
