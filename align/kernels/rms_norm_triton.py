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


@triton.jit
def rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK_H: tl.constexpr):
    """y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) kept (float32) for the backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=cm, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * H + cols, y.to(y_ptr.dtype.element_ty), mask=cm)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rms_norm_backward_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, N, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For ROWS rows: dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd; and this
    program's share of dw = sum over rows of dy * round(xhat), written to dw_partial[program]."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < N:
            x = tl.load(x_ptr + row * H + cols, mask=cm, other=0.0)
            xf = x.to(tl.float32)
            dy = tl.load(dy_ptr + row * H + cols, mask=cm, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = xf * rstd
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / H))
            tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=cm)
    tl.store(dw_partial_ptr + pid * H + cols, dw, mask=cm)
