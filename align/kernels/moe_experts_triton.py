"""Triton kernels of align/kernels/moe_experts.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


@triton.jit
def _expert_rows(ends_ptr, e):
    """[start, end) rows of expert e."""
    end = tl.load(ends_ptr + e)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    return start, end


@triton.jit
def gate_up_kernel(
    x_ptr, x_s, source_ptr, ends_ptr, w_ptr, w_se, w_sn, h_ptr, INTER, H,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """h[r, n] = silu(x[source[r]] · W[e, n]) * (x[source[r]] · W[e, INTER + n]) for expert e's rows."""
    e = tl.program_id(0)
    start, end = _expert_rows(ends_ptr, e)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < INTER
    w_gate = w_ptr + e * w_se + n[:, None] * w_sn  # [N, 1]
    w_up = w_gate + INTER * w_sn
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        token = tl.load(source_ptr + rows, mask=rm, other=0)
        x_rows = x_ptr + token[:, None] * x_s  # [M, 1]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = (k < H) | EVEN_K
            xa = tl.load(x_rows + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            wg = tl.load(w_gate + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            wu = tl.load(w_up + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc_g = tl.dot(xa, tl.trans(wg), acc_g)
            acc_u = tl.dot(xa, tl.trans(wu), acc_u)
        dtype = h_ptr.dtype.element_ty
        g = acc_g.to(dtype).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        h = silu * acc_u.to(dtype).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * INTER + n[None, :], h.to(dtype), mask=rm[:, None] & nm[None, :])


@triton.jit
def down_kernel(
    h_ptr, ends_ptr, w_ptr, w_se, w_sn, out_ptr, H, INTER,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[r, n] = h[r] · W[e, n] for expert e's rows."""
    e = tl.program_id(0)
    start, end = _expert_rows(ends_ptr, e)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < H
    w_rows = w_ptr + e * w_se + n[:, None] * w_sn  # [N, 1]
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = (k < INTER) | EVEN_K
            ha = tl.load(h_ptr + rows[:, None] * INTER + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc = tl.dot(ha, tl.trans(w), acc)
        dest = out_ptr + rows[:, None] * H + n[None, :]
        tl.store(dest, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])
