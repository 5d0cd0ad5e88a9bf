"""Routed-expert SwiGLU MLP for small token counts (the decode step), inference only.

`expert_mlp(x, source, ends, gate_up_proj, down_proj)` computes, for the rows sorted by expert
(align/kernels/moe_route.py: row r reads token source[r]; expert e owns rows [ends[e-1], ends[e])),
    h[r]   = silu(x[source[r]] @ W_gate[e].T) * (x[source[r]] @ W_up[e].T)     [N, I]
    out[r] = h[r] @ W_down[e].T                                              [N, H]
with the layouts of align/models/moe.py (gate_up_proj [E, 2I, H], gate rows first; down_proj
[E, H, I]) and the same roundings as the grouped-GEMM path (each product rounded to the weight
dtype before the SwiGLU).

Two Triton launches, one program per (expert, block of output features). At decode sizes each
expert owns a handful of rows, and the grouped GEMM's large row tiles leave bandwidth unused; here
the row tile is as small as the tensor cores allow (16), the token gather happens inside the first
kernel, the SwiGLU inside its epilogue, and an expert without rows reads none of its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.dispatch import require_contiguous_last_dim, triton_ready
from align.kernels.grouped_mm import grouped_linear

MAX_TOKENS = 512  # beyond this the grouped GEMM's large tiles are the better tool


def expert_mlp_reference(
    x: torch.Tensor, source: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """x [T, H], source [N], ends [E] int32 -> [N, H] in x's dtype, through grouped_linear (the
    path MoE takes for training, prefill and wherever the kernel does not run)."""
    gate, up = grouped_linear(x[source], gate_up_proj, ends).chunk(2, dim=-1)  # [N, I] each
    return grouped_linear(F.silu(gate) * up, down_proj, ends)


def _row_block(rows: int, experts: int) -> int:
    """Row tile: twice the mean rows per expert, as a power of two in [16, 64]."""
    want = max(1, 2 * rows // max(experts, 1))
    return min(64, max(16, 1 << (want - 1).bit_length()))


CONFIG = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}


def expert_mlp(
    x: torch.Tensor, source: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    **config,
) -> torch.Tensor:
    """As expert_mlp_reference, in two launches; config overrides CONFIG's tile sizes."""
    import triton

    from align.kernels import moe_experts_triton as kernels  # Triton only where the kernels run

    n_experts, inter2, hidden = gate_up_proj.shape
    inter, rows = inter2 // 2, source.shape[0]
    require_contiguous_last_dim("expert_mlp", x=x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    config = {**CONFIG, **config}
    block_m, block_n, block_k = _row_block(rows, n_experts), config["block_n"], config["block_k"]
    launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
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


def fused_experts_available(x: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """CUDA, 16-bit, no autograd, at most MAX_TOKENS tokens, weights in x's dtype."""
    if torch.is_grad_enabled() or x.shape[0] > MAX_TOKENS or gate_up_proj.dtype != x.dtype:
        return False
    return triton_ready(x, half=True)
