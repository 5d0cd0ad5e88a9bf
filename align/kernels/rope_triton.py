"""Triton kernels of align/kernels/rope.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


@triton.jit
def _pair_offsets(half, INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    if INTERLEAVED:
        first, second = 2 * j, 2 * j + 1
    else:
        first, second = j, j + half
    return heads, j, first, second


@triton.jit
def _angles(cos_ptr, sin_ptr, t, j, half):
    """Token t's cos / sin at pair indices j, in float32."""
    c = tl.load(cos_ptr + t * half + j, mask=j < half, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * half + j, mask=j < half, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def rope_forward_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, x_tok, x_head, out_tok, out_head, n_heads, half,
    INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Token t: out[h] = [a cos - b sin | b cos + a sin], (a, b) the pairs of x[h], in float32."""
    t = tl.program_id(0).to(tl.int64)
    heads, j, first, second = _pair_offsets(half, INTERLEAVED, BLOCK_HEADS, BLOCK_HALF)
    m = (heads < n_heads) & (j < half)
    row = x_ptr + t * x_tok + heads * x_head
    a = tl.load(row + first, mask=m, other=0.0).to(tl.float32)
    b = tl.load(row + second, mask=m, other=0.0).to(tl.float32)
    c, s = _angles(cos_ptr, sin_ptr, t, j, half)
    dest = out_ptr + t * out_tok + heads * out_head
    tl.store(dest + j, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dest + half + j, (b * c + a * s).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def rope_backward_kernel(
    dout_ptr, cos_ptr, sin_ptr, dx_ptr, d_tok, d_head, dx_tok, dx_head, n_heads, half,
    INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """The transposed rotation: da = d1 cos + d2 sin, db = d2 cos - d1 sin, back to x's pair layout."""
    t = tl.program_id(0).to(tl.int64)
    heads, j, first, second = _pair_offsets(half, INTERLEAVED, BLOCK_HEADS, BLOCK_HALF)
    m = (heads < n_heads) & (j < half)
    row = dout_ptr + t * d_tok + heads * d_head
    d1 = tl.load(row + j, mask=m, other=0.0).to(tl.float32)
    d2 = tl.load(row + half + j, mask=m, other=0.0).to(tl.float32)
    c, s = _angles(cos_ptr, sin_ptr, t, j, half)
    dest = dx_ptr + t * dx_tok + heads * dx_head
    tl.store(dest + first, (d1 * c + d2 * s).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dest + second, (d2 * c - d1 * s).to(dx_ptr.dtype.element_ty), mask=m)
