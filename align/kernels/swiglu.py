"""SwiGLU, silu(gate) * up: the activation of the dense MLP, the shared and the routed experts.

`swiglu(gate, up)` takes the two projections [..., I] (views of one gate_up product are fine: rows
are read through their stride) and returns silu(gate) * up [..., I]. On CUDA in 16-bit one Triton
pass computes it in float32 and rounds once, forward and backward (autograd.Function; the backward
reads gate and up again instead of keeping silu(gate), so it saves one [.., I] tensor per call);
elsewhere `swiglu_reference`, the PyTorch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.dispatch import left_to_inductor, triton_ready

BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up [..., I]."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up, by the Triton kernels where they run."""
    if gate.dtype == up.dtype and gate.shape == up.shape and triton_ready(gate, half=True) and not left_to_inductor():
        return SwiGLU.apply(gate, up)
    return swiglu_reference(gate, up)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., I] -> [N, I] with a unit last stride (a view where the layout allows)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import triton

    from align.kernels import swiglu_triton  # Triton only where the kernels run

    g, u = _rows(gate), _rows(up)
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)  # [N, I]
    if g.numel():
        swiglu_triton.swiglu_forward_kernel[(g.shape[0], triton.cdiv(g.shape[1], BLOCK))](
            g, u, h, g.stride(0), u.stride(0), h.stride(0), g.shape[1], BLOCK=BLOCK
        )
    return h.view(gate.shape)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from align.kernels import swiglu_triton  # Triton only where the kernels run

    g, u, dh = _rows(gate), _rows(up), _rows(grad)
    dg, du = torch.empty_like(g), torch.empty_like(u)  # [N, I] each
    if g.numel():
        swiglu_triton.swiglu_backward_kernel[(g.shape[0], triton.cdiv(g.shape[1], BLOCK))](
            g, u, dh, dg, du, g.stride(0), u.stride(0), dh.stride(0), dg.stride(0), du.stride(0), g.shape[1],
            BLOCK=BLOCK,
        )
    return dg.view(gate.shape), du.view(up.shape)


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, grad)
