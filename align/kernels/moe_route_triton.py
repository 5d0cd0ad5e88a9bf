"""Triton kernels of align/kernels/moe_route.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


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
