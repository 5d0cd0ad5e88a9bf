"""When the Triton inference kernels run (CUDA tensors, Triton importable, not switched off, no
autograd through them), and what their launchers share.

Each op family in align/kernels exports one public function that asks `kernel_path` (plus its own
dtype and size limits) and runs either its Triton launcher or its PyTorch reference; callers never
ask themselves.

`use_triton(False)` (a context manager) or the environment variable ALIGN_TRITON=0 sends every
op back to its PyTorch reference - for debugging, and to measure what the kernels change. The
generation engine keys its CUDA graphs on this switch, so a graph captured with the kernels is
never replayed without them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_enabled = os.environ.get("ALIGN_TRITON", "1") != "0"
_COMPILED_OPS = os.environ.get("ALIGN_COMPILED_OPS", "inductor")  # or "triton"


def triton_enabled() -> bool:
    return _enabled


@contextmanager
def use_triton(enabled: bool) -> Iterator[None]:
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


@functools.cache
def _importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_ready(t: torch.Tensor, half: bool = False) -> bool:
    """Whether a kernel may run on t: CUDA, switched on, Triton importable (and 16-bit if half)."""
    if not _enabled or not t.is_cuda or (half and t.dtype not in (torch.bfloat16, torch.float16)):
        return False
    return _importable()


def left_to_inductor() -> bool:
    """Whether an elementwise op with a training kernel (RMSNorm, SwiGLU, RoPE) runs as its PyTorch
    reference because torch.compile is tracing it: inductor then fuses it with its neighbours, and its
    partitioner may recompute its output in the backward instead of keeping it (a Triton autograd.Function
    is opaque to both). ALIGN_COMPILED_OPS=triton keeps the kernels in compiled code too (to measure)."""
    return _COMPILED_OPS != "triton" and torch.compiler.is_compiling()


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a result computed from these tensors must carry a gradient (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_path(*tensors: torch.Tensor, half: bool = False) -> bool:
    """Whether a forward-only Triton kernel serves a call on these tensors: the first is on CUDA
    (16-bit if half), the switch is on, Triton imports, and no gradient must flow through the result."""
    return triton_ready(tensors[0], half) and not needs_autograd(*tensors)


def pow2_block(n: int, least: int = 16) -> int:
    """Smallest power of two >= n and >= least (tl.dot needs 16 along each dimension)."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def require_contiguous_last_dim(op: str, **tensors: torch.Tensor) -> None:
    """Kernels index rows through their stride and assume unit stride along the last dimension."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a contiguous last dimension, got strides {t.stride()}")
