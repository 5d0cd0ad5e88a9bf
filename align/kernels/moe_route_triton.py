"""Triton kernels of align/kernels/moe_route.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


@triton.jit
def sort_kernel(
    experts_ptr, source_ptr, position_ptr, ends_ptr, N, K, E,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program: count slots per expert, then give each slot its stable rank in expert order."""
    e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, N, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        chosen = tl.load(experts_ptr + i, mask=i < N, other=-1)
        counts += tl.sum((chosen[:, None] == e[None, :]).to(tl.int32), 0)  # [E]
    ends = tl.cumsum(counts, 0)
    tl.store(ends_ptr + e, ends, mask=e < E)
    taken = ends - counts  # next free row of each expert
    for start in range(0, N, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        im = i < N
        chosen = tl.load(experts_ptr + i, mask=im, other=-1)
        hit = (chosen[:, None] == e[None, :]).to(tl.int32)  # [N, E]
        rank = tl.cumsum(hit, 0) - hit + taken[None, :]  # [N, E] row each slot would take per expert
        row = tl.sum(hit * rank, 1)  # [N]
        tl.store(position_ptr + i, row.to(tl.int64), mask=im)
        tl.store(source_ptr + row, (i // K).to(tl.int64), mask=im)
        taken += tl.sum(hit, 0)


@triton.jit
def combine_kernel(
    out_ptr, out_s, position_ptr, weights_ptr, result_ptr, H,
    K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """result[t, cols] = sum_j (weights[t, j] in out's dtype) * out[position[t, j], cols]."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        row = tl.load(position_ptr + t * K + j)
        w = tl.load(weights_ptr + t * K + j).to(out_ptr.dtype.element_ty)
        x = tl.load(out_ptr + row * out_s + cols, mask=cm, other=0.0)
        acc += (x * w).to(tl.float32)
    tl.store(result_ptr + t * H + cols, acc.to(result_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _top_k_sum(scores, e, K: tl.constexpr):
    """Sum of each row's K largest scores (scores [T, E] >= 0, padding at -1)."""
    remaining = scores
    total = tl.zeros([scores.shape[0]], tl.float32)
    for _ in tl.static_range(K):
        best = tl.max(remaining, 1)
        pick = tl.min(tl.where(remaining == best[:, None], e[None, :], scores.shape[1]), 1)
        total += best
        remaining = tl.where(e[None, :] == pick[:, None], -1.0, remaining)
    return total


@triton.jit
def greedy_gate_kernel(
    x_ptr, x_s, w_ptr, w_s, weights_ptr, experts_ptr, T, H, E, scaling,
    K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Gate logits (float32 accumulation), softmax, the K best experts (first index on ties), weights."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    e = tl.arange(0, BLOCK_E)
    em = e < E
    logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        hm = h < H
        xb = tl.load(x_ptr + t[:, None] * x_s + h[None, :], mask=tm[:, None] & hm[None, :], other=0.0)
        wb = tl.load(w_ptr + e[:, None] * w_s + h[None, :], mask=em[:, None] & hm[None, :], other=0.0)
        logits += tl.dot(xb, tl.trans(wb), input_precision="ieee")
    logits = tl.where(em[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    scores = tl.where(em[None, :], p / tl.sum(p, 1)[:, None], -1.0)  # [T, E], padding below any score
    denom = tl.full([BLOCK_T], 1.0, tl.float32)
    if NORM:
        denom = _top_k_sum(scores, e, K) + 1e-20
    remaining = scores
    for j in tl.static_range(K):
        best = tl.max(remaining, 1)
        pick = tl.min(tl.where(remaining == best[:, None], e[None, :], BLOCK_E), 1)
        tl.store(experts_ptr + t * K + j, pick.to(tl.int64), mask=tm)
        tl.store(weights_ptr + t * K + j, best / denom * scaling, mask=tm)
        remaining = tl.where(e[None, :] == pick[:, None], -1.0, remaining)
