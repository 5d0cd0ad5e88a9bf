"""Triton kernel of align/kernels/sample_rows.py (imported only when it runs; see that module)."""

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """sample_rows.mix32 on uint32 (products wrap mod 2^32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def keyed_uniform(key, vocab_hash_ptr, v, vm):
    """sample_rows.KeyedNoise.uniform at indices v of the row keyed `key` (uint32)."""
    h = tl.load(vocab_hash_ptr + v, mask=vm, other=0).to(tl.uint32)
    x = mix32(mix32(h ^ key) + key)
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23


@triton.jit
def sample_kernel(
    logits_ptr, l_s, u_ptr, u_s, key_ptr, vocab_hash_ptr, token_ptr, logprob_ptr, V, temperature,
    GREEDY: tl.constexpr, KEYED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    if KEYED:
        key = tl.load(key_ptr + row).to(tl.uint32)
    lanes = tl.arange(0, BLOCK_V)
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: max of scaled logits
    run_sum = tl.zeros([BLOCK_V], tl.float32)  # per lane: sum of exp(scaled - run_max)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: best perturbed score
    best_idx = tl.full([BLOCK_V], 2147483647, tl.int32)
    best_logit = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + lanes
        vm = v < V
        x = tl.load(logits_ptr + row * l_s + v, mask=vm, other=float("-inf")).to(tl.float32)
        if not GREEDY:
            x = x / temperature
        new_max = tl.maximum(run_max, x)
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.where(vm, tl.exp(x - new_max), 0.0)
        run_max = new_max
        score = x
        if not GREEDY:
            if KEYED:
                u = keyed_uniform(key, vocab_hash_ptr, v, vm)
            else:
                u = tl.load(u_ptr + row * u_s + v, mask=vm, other=0.5)
            score = x - tl.log(-tl.log(tl.maximum(u, 1.1754943508222875e-38)))
        score = tl.where(vm, score, float("-inf"))
        better = score > best  # strictly: the earliest index wins ties within a lane
        best = tl.where(better, score, best)
        best_idx = tl.where(better, v, best_idx)
        best_logit = tl.where(better, x, best_logit)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, best_idx, 2147483647), 0)  # earliest index among lanes
    chosen = tl.sum(tl.where(best_idx == winner, best_logit, 0.0), 0)
    row_max = tl.max(run_max, 0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), 0)
    tl.store(token_ptr + row, winner.to(tl.int64))
    tl.store(logprob_ptr + row, chosen - row_max - tl.log(total))
