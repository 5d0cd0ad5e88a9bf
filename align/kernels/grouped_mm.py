"""Grouped linear for MoE experts: rows sorted by expert, one matrix product per expert, one launch.

`grouped_linear(x, weight, ends)` computes `x[rows of e] @ weight[e].T` for every expert e, where
the rows of x are sorted by expert and expert e owns rows [ends[e-1], ends[e]) (ends: cumulative
counts, int32, the grouped GEMM's offsets). Weights keep the Linear layout
[E, out, in] (the layout transformers and PEFT use for stacked experts).

`grouped_linear(x, weight, ends, updates)` adds low-rank updates of the weight (LoRA on stacked
experts) beside the frozen product: x @ (W[e] + s * B[e] @ A[e]).T = x @ W[e].T + s * (x @ A[e].T) @ B[e].T,
two more grouped products of rank r, so W + dW is never built.

Paths:
- CUDA, Hopper or newer, bf16, dims multiple of 8: `torch._grouped_mm` (CUTLASS grouped GEMM,
  forward and backward), no host synchronisation.
- Elsewhere (CPU, float32/64 checks, older GPUs): `grouped_linear_reference`, a padded batched
  matmul: tokens are scattered into an [E, capacity, in] buffer and multiplied with one `bmm`. It
  costs one host sync per call (for the capacity), never one per expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _group_positions(counts: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted rows: the expert of each row and its rank inside that expert's block."""
    experts = torch.arange(counts.numel(), device=counts.device)
    group = torch.repeat_interleave(experts, counts, output_size=rows)  # [N]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank = torch.arange(rows, device=counts.device) - starts[group]  # [N]
    return group, rank


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by expert, weight [E, out, in], ends [E] -> [N, out]."""
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros(0, weight.shape[1])
    counts = torch.diff(ends.long(), prepend=ends.new_zeros(1).long())  # [E]
    group, rank = _group_positions(counts, rows)
    capacity = int(counts.max())
    padded = x.new_zeros(weight.shape[0], capacity, x.shape[1])  # [E, C, in]
    padded = padded.index_put((group, rank), x)
    out = torch.bmm(padded, weight.transpose(1, 2))  # [E, C, out]
    return out[group, rank]


def grouped_linear_sync_free(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_linear runs without host synchronisation on this device and dtype (given aligned
    dims): the grouped GEMM, not the padded reference. What CUDA-graph capture of a MoE step needs."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.dtype != x.dtype or not grouped_linear_sync_free(x.device, x.dtype):
        return False
    return x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0


class LowRank(NamedTuple):
    """A low-rank update scaling * b[e] @ a[e] of a stacked weight [E, out, in]."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scaling: float


def _grouped(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    if _use_grouped_mm(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)
    return grouped_linear_reference(x, weight, ends)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, updates: tuple[LowRank, ...] = ()
) -> torch.Tensor:
    """x [N, in] sorted by expert, weight [E, out, in], ends [E] int32 -> [N, out] (+ the low-rank updates)."""
    out = _grouped(x, weight, ends)
    for a, b, scaling in updates:
        low = _grouped(x, a, ends)  # [N, r]
        out = out + _grouped(low, b, ends) * scaling
    return out
