"""Triton kernel of align/kernels/rms_norm.py (imported only when it runs; see that module)."""

import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, total_ptr, normed_ptr, H, eps,
    HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=cm, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * H + cols, mask=cm, other=0.0).to(tl.float32))
        x = x.to(total_ptr.dtype.element_ty)
        tl.store(total_ptr + row * H + cols, x, mask=cm)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0)
    normed = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(normed_ptr + row * H + cols, normed.to(normed_ptr.dtype.element_ty), mask=cm)
