"""Small-batch routed-expert MLP kernel against the grouped-GEMM reference."""

from __future__ import annotations

import pytest
import torch

from align.kernels.moe_experts import expert_mlp, expert_mlp_reference
from align.kernels.moe_route import sort_by_expert_reference
from tests.kernels.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,k,n_experts,hidden,inter",
    [(64, 6, 64, 256, 128), (3, 2, 5, 40, 24), (40, 4, 4, 64, 200), (1, 1, 3, 16, 16)],
)
def test_expert_mlp_matches_reference(dtype, tokens, k, n_experts, hidden, inter):
    gen = torch.Generator().manual_seed(tokens * k + hidden)
    choice = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)]).to(DEVICE)
    source, _, ends = sort_by_expert_reference(choice, n_experts)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    gate_up = (torch.randn(n_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    down = (torch.randn(n_experts, hidden, inter, generator=gen) / inter**0.5).to(DEVICE, dtype)
    ours = expert_mlp(x, source, ends, gate_up, down)
    ref = expert_mlp_reference(x, source, ends, gate_up, down)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
