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
def combine_backward_kernel(
    out_ptr, out_s, position_ptr, weights_ptr, grad_ptr, grad_s, d_out_ptr, d_weights_ptr, H,
    K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For token t: d_out[position[t, j]] = weights[t, j] * grad[t] (each sorted row is one slot, so
    no atomics) and d_weights[t, j] = sum_h out[position[t, j], h] * grad[t, h], in float32."""
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        row = tl.load(position_ptr + t * K + j)
        w = tl.load(weights_ptr + t * K + j).to(out_ptr.dtype.element_ty).to(tl.float32)
        dot = tl.zeros([BLOCK_H], tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            cm = cols < H
            g = tl.load(grad_ptr + t * grad_s + cols, mask=cm, other=0.0).to(tl.float32)
            x = tl.load(out_ptr + row * out_s + cols, mask=cm, other=0.0).to(tl.float32)
            dot += x * g
            tl.store(d_out_ptr + row * H + cols, (g * w).to(d_out_ptr.dtype.element_ty), mask=cm)
        tl.store(d_weights_ptr + t * K + j, tl.sum(dot, 0))


@triton.jit
def expert_tail_backward_kernel(
    gu_ptr, gu_s, dh_ptr, dh_s, w_ptr, d_gu_ptr, d_gu_s, d_w_ptr, inter, BLOCK: tl.constexpr,
):
    """For sorted row r, with gate / up = gate_up[r, :I] / gate_up[r, I:] and d = d_h_raw[r] (the row's
    output gradient through the down product, before its routing weight w[r]):
    d_w[r] = sum_i d * h (h = silu(gate) * up in gate_up's dtype, as the forward multiplied), and the
    SwiGLU backward of w[r] * d into d_gate_up[r], in float32."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(gu_ptr.dtype.element_ty).to(tl.float32)
    dot = tl.zeros([BLOCK], tl.float32)
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < inter
        g = tl.load(gu_ptr + row * gu_s + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * gu_s + inter + cols, mask=m, other=0.0).to(tl.float32)
        d = tl.load(dh_ptr + row * dh_s + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        h = (g * s * u).to(gu_ptr.dtype.element_ty).to(tl.float32)
        dot += d * h
        dh = d * w
        d_gate = dh * u * s * (1.0 + g * (1.0 - s))
        tl.store(d_gu_ptr + row * d_gu_s + cols, d_gate.to(d_gu_ptr.dtype.element_ty), mask=m)
        tl.store(d_gu_ptr + row * d_gu_s + inter + cols, (dh * g * s).to(d_gu_ptr.dtype.element_ty), mask=m)
    tl.store(d_w_ptr + row, tl.sum(dot, 0))
