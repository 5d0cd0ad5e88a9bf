"""MoE routing kernels (sort by expert, weighted combine) against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from align.kernels.moe_route import (
    combine,
    combine_reference,
    greedy_gate,
    greedy_gate_reference,
    sort_by_expert,
    sort_by_expert_reference,
)
from tests.kernels.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("tokens,k,n_experts", [(64, 6, 64), (1, 1, 4), (37, 3, 5), (200, 8, 160)])
def test_sort_by_expert_matches_stable_argsort(tokens, k, n_experts):
    gen = torch.Generator().manual_seed(tokens)
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)]).to(DEVICE)
    ours = sort_by_expert(experts, n_experts)
    ref = sort_by_expert_reference(experts, n_experts)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_sort_by_expert_skewed_and_too_many_slots():
    experts = torch.zeros(100, 2, dtype=torch.long, device=DEVICE)
    experts[:, 1] = 3  # every token picks experts 0 and 3
    for a, b in zip(sort_by_expert(experts, 8), sort_by_expert_reference(experts, 8), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at most 8192 routed slots"):
        sort_by_expert(torch.zeros(5000, 2, dtype=torch.long, device=DEVICE), 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,hidden", [(64, 6, 2048), (3, 2, 40), (5, 1, 1500)])
def test_combine_matches_reference(dtype, tokens, k, hidden):
    gen = torch.Generator().manual_seed(hidden)
    out = torch.randn(tokens * k, hidden, generator=gen).to(DEVICE, dtype)
    position = torch.randperm(tokens * k, generator=gen).view(tokens, k).to(DEVICE)
    weights = torch.rand(tokens, k, generator=gen).to(DEVICE)
    ours = combine(out, position, weights)
    ref = combine_reference(out, position, weights)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,hidden,n_experts,k,norm", [(64, 2048, 64, 6, False), (5, 40, 10, 3, True), (33, 64, 4, 1, True)]
)
def test_greedy_gate_matches_reference(dtype, tokens, hidden, n_experts, k, norm):
    gen = torch.Generator().manual_seed(tokens + k)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(n_experts, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    weights, experts = greedy_gate(x, weight, k, norm, 2.5)
    ref_weights, ref_experts = greedy_gate_reference(x, weight, k, norm, 2.5)
    assert weights.dtype == torch.float32 and experts.dtype == torch.long
    assert torch.equal(experts, ref_experts)  # best first, as torch.topk(sorted=True)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
