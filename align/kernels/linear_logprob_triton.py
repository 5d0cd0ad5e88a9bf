"""Triton kernels of align/kernels/linear_logprob.py (imported only when they run; see that module).

One program per row of a [c, V] logits chunk, in its own dtype (the head GEMM's output), looping over the
vocabulary in BLOCK-wide tiles: float32 inside, no [c, V] float32 copy anywhere.
"""

import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(
    logits_ptr, stride, targets_ptr, lse_ptr, logp_ptr, entropy_ptr, vocab, temperature,
    ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """lse, log p(target) and (ENTROPY) the entropy of softmax(logits[row] / temperature): an online
    max / sum per lane, merged at the end."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    top = tl.full([BLOCK], -3.0e38, tl.float32)  # finite: exp(top - new) never meets inf - inf
    total = tl.zeros([BLOCK], tl.float32)  # sum exp(x - top) per lane
    weighted = tl.zeros([BLOCK], tl.float32)  # sum exp(x - top) * x per lane (entropy)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature
        new = tl.maximum(top, x)
        rescale = tl.exp(top - new)
        e = tl.exp(x - new)
        total = total * rescale + e
        if ENTROPY:
            weighted = weighted * rescale + e * tl.where(inside, x, 0.0)  # e is 0 outside
        top = new
    peak = tl.max(top, 0)
    lane = tl.exp(top - peak)
    norm = tl.sum(total * lane, 0)
    lse = peak + tl.log(norm)
    target = tl.load(targets_ptr + row)
    picked = tl.load(base + target).to(tl.float32) / temperature
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, picked - lse)
    if ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(weighted * lane, 0) / norm)


@triton.jit
def row_grad_kernel(
    logits_ptr, stride, targets_ptr, lse_ptr, scale_ptr, vocab, temperature, BLOCK: tl.constexpr,
):
    """In place: logits[row] <- scale[row] * (softmax(logits[row] / temperature) - onehot(target)),
    rounded to the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) / temperature
        p = tl.exp(x - lse)
        p = tl.where(cols == target, p - 1.0, p)
        tl.store(base + cols, (p * scale).to(logits_ptr.dtype.element_ty), mask=inside)
