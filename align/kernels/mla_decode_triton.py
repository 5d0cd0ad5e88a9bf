"""Triton kernels of align/kernels/mla_decode.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


@triton.jit
def rope_halves(ptr, p, pm, cos, sin, INTERLEAVED: tl.constexpr, P2: tl.constexpr):
    """Load pairs (a_i, b_i) of one rotary vector at ptr (any leading block shape via ptr)."""
    if INTERLEAVED:
        a = tl.load(ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
        b = tl.load(ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    else:
        a = tl.load(ptr + p, mask=pm, other=0.0).to(tl.float32)
        b = tl.load(ptr + p + P2, mask=pm, other=0.0).to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def write_latent_kernel(
    kv_ptr, kv_sb, w_ptr, cos_ptr, sin_ptr, cs_sb, rows_ptr, r_sb, r_st, pos_ptr, eps,
    R: tl.constexpr, P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P2: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    b = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    c = tl.load(kv_ptr + b * kv_sb + r, mask=rm, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(c * c, 0) / R + eps)
    w = tl.load(w_ptr + r, mask=rm, other=0.0)
    normed = (c * inv).to(w.dtype).to(tl.float32) * w.to(tl.float32)  # scale in the input dtype
    pos = tl.load(pos_ptr + b)
    out = rows_ptr + b * r_sb + pos * r_st
    tl.store(out + r, normed.to(rows_ptr.dtype.element_ty), mask=rm)
    p = tl.arange(0, BLOCK_P2)
    pm = p < P2
    cos = tl.load(cos_ptr + b * cs_sb + p, mask=pm, other=0.0)
    sin = tl.load(sin_ptr + b * cs_sb + p, mask=pm, other=0.0)
    lo, hi = rope_halves(kv_ptr + b * kv_sb + R, p, pm, cos, sin, INTERLEAVED, P2)
    tl.store(out + R + p, lo.to(kv_ptr.dtype.element_ty).to(rows_ptr.dtype.element_ty), mask=pm)
    tl.store(out + R + P2 + p, hi.to(kv_ptr.dtype.element_ty).to(rows_ptr.dtype.element_ty), mask=pm)


@triton.jit
def latent_attention_kernel(
    ql_ptr, ql_sb, ql_sh, qp_ptr, qp_sb, qp_sh, cos_ptr, sin_ptr, cs_sb,
    rows_ptr, r_sb, r_st, pos_ptr, out_ptr, o_sb, o_sh, scale,
    H, R: tl.constexpr, P2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P2: tl.constexpr, BLOCK_T: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)
    hm = heads < H
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    p = tl.arange(0, BLOCK_P2)
    pm = p < P2
    ql = tl.load(ql_ptr + b * ql_sb + heads[:, None] * ql_sh + r[None, :], mask=hm[:, None] & rm[None, :], other=0.0)
    cos = tl.load(cos_ptr + b * cs_sb + p, mask=pm, other=0.0)[None, :]
    sin = tl.load(sin_ptr + b * cs_sb + p, mask=pm, other=0.0)[None, :]
    q_lo, q_hi = rope_halves(
        qp_ptr + b * qp_sb + heads[:, None] * qp_sh, p[None, :], hm[:, None] & pm[None, :], cos, sin,
        INTERLEAVED, P2,
    )
    q_lo, q_hi = q_lo.to(qp_ptr.dtype.element_ty).to(ql.dtype), q_hi.to(qp_ptr.dtype.element_ty).to(ql.dtype)
    pos = tl.load(pos_ptr + b)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for start in range(0, pos + 1, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tm = t <= pos
        row = rows_ptr + b * r_sb + t[:, None] * r_st  # [T, 1]
        c = tl.load(row + r[None, :], mask=tm[:, None] & rm[None, :], other=0.0)  # [T, R]
        k_lo = tl.load(row + R + p[None, :], mask=tm[:, None] & pm[None, :], other=0.0)  # [T, P2]
        k_hi = tl.load(row + R + P2 + p[None, :], mask=tm[:, None] & pm[None, :], other=0.0)
        s = tl.dot(ql, tl.trans(c)) + tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))  # [H, T]
        s = tl.where(tm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(c.dtype), c)
        m = m_new
    out = acc / total[:, None]
    dest = out_ptr + b * o_sb + heads[:, None] * o_sh + r[None, :]
    tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=hm[:, None] & rm[None, :])
