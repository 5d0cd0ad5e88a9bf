"""Triton kernels of align/kernels/swiglu.py (imported only when they run; see that module)."""

import triton
import triton.language as tl


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, g_stride, u_stride, h_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    g = tl.load(g_ptr + row * g_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=m, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + row * h_stride + cols, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_backward_kernel(
    g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, g_stride, u_stride, dh_stride, dg_stride, du_stride, inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    g = tl.load(g_ptr + row * g_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * dh_stride + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * g * s
    tl.store(dg_ptr + row * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + row * du_stride + cols, du.to(du_ptr.dtype.element_ty), mask=m)
