"""The plain greedy gate kernel against its PyTorch reference, and the public op's dispatch."""

from __future__ import annotations

import pytest
import torch

from align.kernels.moe_route import _greedy_gate_triton, greedy_gate, greedy_gate_reference
from tests.kernels.conftest import DEVICE, DTYPES


def by_expert(weights: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (weights, experts) ordered by expert id: the order of the k choices is unspecified."""
    order = experts.argsort(-1)
    return weights.gather(1, order), experts.gather(1, order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,hidden,n_experts,k,norm", [(64, 2048, 64, 6, False), (5, 40, 10, 3, True), (33, 64, 4, 1, True)]
)
def test_greedy_gate_matches_reference(dtype, tokens, hidden, n_experts, k, norm):
    gen = torch.Generator().manual_seed(tokens + k)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(n_experts, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    weights, experts = _greedy_gate_triton(x, weight, k, norm, 2.5)
    ref_weights, ref_experts = greedy_gate_reference(x, weight, k, norm, 2.5)
    assert weights.dtype == torch.float32 and experts.dtype == torch.long
    assert torch.equal(experts, experts.gather(1, weights.argsort(-1, descending=True)))  # best first
    weights, experts = by_expert(weights, experts)
    ref_weights, ref_experts = by_expert(ref_weights, ref_experts)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_greedy_gate_is_the_reference_on_cpu_and_with_autograd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 32, generator=gen)
    weight = torch.randn(6, 32, generator=gen, requires_grad=True)
    weights, experts = greedy_gate(x, weight, 2, False, 1.0)
    ref_weights, ref_experts = greedy_gate_reference(x, weight, 2, False, 1.0)
    assert torch.equal(experts, ref_experts) and torch.equal(weights, ref_weights)
    weights.sum().backward()
    assert weight.grad is not None
