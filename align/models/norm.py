"""RMSNorm, normalising in float32 and scaling in the input dtype (as the reference does)."""

from __future__ import annotations

import torch
from torch import nn

from align.kernels.rms_norm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)) in one pass where a kernel runs; delta None normalises x alone."""
        return add_rms_norm(x, delta, self.weight, self.eps)
