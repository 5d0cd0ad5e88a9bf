"""Routed-expert kernels (sort by expert, small-batch expert MLP, weighted combine) against their
PyTorch references, and the public op against the plain per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.kernels.grouped_mm import grouped_linear
from align.kernels.moe_experts import (
    Combine,
    ExpertTail,
    _combine_triton,
    _expert_mlp_triton,
    _sort_by_expert_triton,
    combine_reference,
    expert_mlp_reference,
    routed_experts,
    sort_by_expert_reference,
)
from align.kernels.swiglu import swiglu_reference
from align.train.activation_memory import saved_bytes
from tests.kernels.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("tokens,k,n_experts", [(64, 6, 64), (1, 1, 4), (37, 3, 5), (200, 8, 160)])
def test_sort_by_expert_matches_stable_argsort(tokens, k, n_experts):
    gen = torch.Generator().manual_seed(tokens)
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)]).to(DEVICE)
    ours = _sort_by_expert_triton(experts, n_experts)
    ref = sort_by_expert_reference(experts, n_experts)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_sort_by_expert_skewed_and_too_many_slots():
    experts = torch.zeros(100, 2, dtype=torch.long, device=DEVICE)
    experts[:, 1] = 3  # every token picks experts 0 and 3
    for a, b in zip(_sort_by_expert_triton(experts, 8), sort_by_expert_reference(experts, 8), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at most 8192 routed slots"):
        _sort_by_expert_triton(torch.zeros(5000, 2, dtype=torch.long, device=DEVICE), 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,hidden", [(64, 6, 2048), (3, 2, 40), (5, 1, 1500)])
def test_combine_matches_reference(dtype, tokens, k, hidden):
    gen = torch.Generator().manual_seed(hidden)
    out = torch.randn(tokens * k, hidden, generator=gen).to(DEVICE, dtype)
    position = torch.randperm(tokens * k, generator=gen).view(tokens, k).to(DEVICE)
    weights = torch.rand(tokens, k, generator=gen).to(DEVICE)
    ours = _combine_triton(out, position, weights)
    ref = combine_reference(out, position, weights)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,hidden", [(64, 6, 2048), (3, 2, 40), (5, 1, 3000)])
def test_combine_backward_matches_reference(dtype, tokens, k, hidden):
    """Gradients of the rows and of the routing weights, against the reference in float64."""
    gen = torch.Generator().manual_seed(hidden + 1)
    out = torch.randn(tokens * k, hidden, generator=gen).to(dtype)
    position = torch.randperm(tokens * k, generator=gen).view(tokens, k)
    weights = torch.rand(tokens, k, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen).to(dtype)
    leaves = [out.to(DEVICE).clone().requires_grad_(), weights.to(DEVICE).clone().requires_grad_()]
    Combine.apply(leaves[0], position.to(DEVICE), leaves[1]).backward(grad.to(DEVICE))
    ref_leaves = [out.double().requires_grad_(), weights.double().requires_grad_()]
    combine_reference(ref_leaves[0], position, ref_leaves[1]).backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, ref in zip(leaves, ref_leaves, strict=True):
        assert ours.grad.dtype == ours.dtype
        scale = ref.grad.abs().max()
        torch.testing.assert_close(ours.grad.double().cpu() / scale, ref.grad / scale, rtol=tol, atol=tol)


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
    ours = _expert_mlp_triton(x, source, ends, gate_up, down)
    ref = expert_mlp_reference(x, source, ends, gate_up, down)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_routed_experts_equals_the_per_token_loop():
    gen = torch.Generator().manual_seed(4)
    tokens, k, n_experts, hidden, inter = 9, 3, 5, 16, 8
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    gate_up = torch.randn(n_experts, 2 * inter, hidden, generator=gen, dtype=torch.float64)
    down = torch.randn(n_experts, hidden, inter, generator=gen, dtype=torch.float64)
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(k):
            gate, up = (gate_up[experts[t, j]] @ x[t]).chunk(2)
            want[t] += weights[t, j].double() * (down[experts[t, j]] @ (F.silu(gate) * up))
    torch.testing.assert_close(routed_experts(x, weights, experts, gate_up, down), want)


def tail_case(dtype, tokens, k, n_experts, hidden, inter, seed=0):
    gen = torch.Generator().manual_seed(seed + tokens * k + inter)
    choice = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    source, position, ends = sort_by_expert_reference(choice, n_experts)
    gate_up = torch.randn(tokens * k, 2 * inter, generator=gen).to(dtype)
    down = (torch.randn(n_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    weights = torch.rand(tokens, k, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen).to(dtype)
    return gate_up, down, ends, source, position, weights, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,k,n_experts,hidden,inter", [(64, 6, 8, 256, 128), (5, 2, 3, 40, 600), (1, 1, 2, 16, 16)]
)
def test_expert_tail_matches_reference_forward_and_backward(dtype, tokens, k, n_experts, hidden, inter):
    """ExpertTail (SwiGLU, frozen down product, combine; the routing weights' gradient through the down
    weight) against the unfused reference path in float64: output, gate_up and routing-weight gradients."""
    gate_up, down, ends, source, position, weights, grad = tail_case(dtype, tokens, k, n_experts, hidden, inter)
    leaves = [gate_up.to(DEVICE).clone().requires_grad_(), weights.to(DEVICE).clone().requires_grad_()]
    index = [t.to(DEVICE) for t in (ends, source, position)]
    out = ExpertTail.apply(leaves[0], down.to(DEVICE), *index, leaves[1])
    out.backward(grad.to(DEVICE))
    ref_leaves = [gate_up.double().requires_grad_(), weights.double().requires_grad_()]
    gate, up = ref_leaves[0].chunk(2, dim=-1)
    rows = grouped_linear(swiglu_reference(gate, up), down.double(), ends)
    ref = combine_reference(rows, position, ref_leaves[1])
    ref.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    torch.testing.assert_close(out.double().cpu() / ref.abs().max(), ref.detach() / ref.abs().max(), rtol=tol, atol=tol)
    for ours, want in zip(leaves, ref_leaves, strict=True):
        assert ours.grad.dtype == ours.dtype
        scale = want.grad.abs().max()
        torch.testing.assert_close(ours.grad.double().cpu() / scale, want.grad / scale, rtol=tol, atol=tol)


def test_expert_tail_keeps_no_expert_outputs():
    """What backward keeps: ExpertTail saves only its inputs; the unfused combine keeps the [T*k, H] rows."""
    case = tail_case(torch.float32, 32, 4, 4, 64, 16)[:-1]
    gate_up, down, ends, source, position, weights = (t.to(DEVICE) for t in case)
    gate_up.requires_grad_()
    weights.requires_grad_()
    inputs = [gate_up, down, ends, source, position, weights]
    tail, _ = saved_bytes(ExpertTail.apply, *inputs, exclude=inputs)
    assert tail == 0

    def unfused(gate_up, down, ends, source, position, weights):
        gate, up = gate_up.chunk(2, dim=-1)
        return Combine.apply(grouped_linear(swiglu_reference(gate, up), down, ends), position, weights)

    kept, _ = saved_bytes(unfused, *inputs, exclude=inputs)
    assert kept >= 32 * 4 * 64 * 4  # at least the expert outputs, float32


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused tail serves CUDA 16-bit training only")
def test_routed_experts_takes_the_tail_only_for_a_frozen_down_proj():
    tokens, k, n_experts, hidden, inter = 48, 4, 8, 128, 64
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, k, generator=gen).to(DEVICE).requires_grad_()
    gate_up = (torch.randn(n_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(DEVICE, torch.bfloat16)
    down = (torch.randn(n_experts, hidden, inter, generator=gen) / inter**0.5).to(DEVICE, torch.bfloat16)
    out = routed_experts(x, weights, experts, gate_up, down)
    assert type(out.grad_fn).__name__ == "ExpertTailBackward"
    trained = routed_experts(x, weights, experts, gate_up, down.clone().requires_grad_())
    assert type(trained.grad_fn).__name__ == "CombineBackward"
    grads = torch.autograd.grad(out.float().square().sum(), [x, weights])
    want = torch.autograd.grad(trained.float().square().sum(), [x, weights])
    for ours, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(ours.float() / ref.abs().max(), ref.float() / ref.abs().max(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("adapted", [(), ("gate_up_proj",), ("gate_up_proj", "down_proj")])
def test_training_dispatch_traces_in_one_graph_with_expert_adapters(monkeypatch, adapted):
    """Which routed-experts path a training call takes, with LoRA updates on the experts, compiles without a
    graph break (fullgraph), as on the GPU (triton_ready patched true here). `not` on the updates' tuple broke
    each compiled MoE layer's graph with lora.routed_experts on (found on an H200, torch 2.11; 2.13 too)."""
    from align.kernels import moe_experts
    from align.kernels.grouped_mm import LowRank

    monkeypatch.setattr(moe_experts, "triton_ready", lambda t, half=False: True)
    x = torch.randn(4, 8, requires_grad=True)
    weights, gate_up, down = torch.rand(4, 2), torch.randn(3, 6, 8), torch.randn(3, 8, 3)
    low = LowRank(torch.randn(3, 2, 8), torch.randn(3, 6, 2), 0.5)
    updates = {name: (low,) for name in adapted}

    def decide(x, weights, gate_up, down, updates):
        return moe_experts._tail_fuses(x, weights, gate_up, down, updates), moe_experts._update_count(updates)

    compiled = torch.compile(decide, fullgraph=True, backend="eager")
    assert compiled(x, weights, gate_up, down, updates) == ("down_proj" not in adapted, len(adapted))
