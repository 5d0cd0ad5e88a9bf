"""The Triton switch: off by context manager, restored afterwards; CPU tensors and results that need
a gradient never dispatch to a kernel."""

from __future__ import annotations

import torch

from align.kernels.dispatch import kernel_path, needs_autograd, triton_enabled, triton_ready, use_triton


def test_use_triton_switches_and_restores():
    before = triton_enabled()
    with use_triton(False):
        assert not triton_enabled()
        assert not triton_ready(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"))
    assert triton_enabled() == before
    assert not triton_ready(torch.zeros(1))  # CPU: references always


def test_kernel_path_needs_no_gradient_through_the_result():
    x = torch.zeros(2)
    weight = torch.zeros(2, requires_grad=True)
    assert needs_autograd(x, weight)
    assert not needs_autograd(x)
    with torch.no_grad():
        assert not needs_autograd(x, weight)
    assert not kernel_path(x)  # CPU: references always
