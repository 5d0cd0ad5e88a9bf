"""The Triton switch: off by context manager, restored afterwards; CPU tensors never dispatch."""

from __future__ import annotations

import torch

from align.kernels.dispatch import triton_enabled, triton_ready, use_triton


def test_use_triton_switches_and_restores():
    before = triton_enabled()
    with use_triton(False):
        assert not triton_enabled()
        assert not triton_ready(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"))
    assert triton_enabled() == before
    assert not triton_ready(torch.zeros(1))  # CPU: references always
