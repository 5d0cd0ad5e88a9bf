"""Triton kernel of align/kernels/sample_rows.py (imported only when it runs; see that module)."""

import triton
import triton.language as tl


@triton.jit
def sample_kernel(
    logits_ptr, l_s, u_ptr, u_s, token_ptr, logprob_ptr, V, temperature,
    GREEDY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
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
