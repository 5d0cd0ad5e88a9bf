"""Chunked linear log-prob / cross-entropy against the plain PyTorch computation."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from align.kernels.linear_logprob import (
    entropy_reference,
    linear_cross_entropy,
    linear_logprobs,
    linear_logprobs_entropy,
    linear_logprobs_reference,
    linear_nll_sum,
)
from tests.kernels.conftest import DEVICE, DTYPES


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk,temperature", [(7, 1.0), (64, 0.7), (1000, 1.3)])
def test_forward_backward_match_reference(dtype, tol, chunk, temperature):
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(50, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(37, 16, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 37, (50,), generator=gen)
    grad = torch.randn(50, generator=gen, dtype=torch.float32)
    ours = linear_logprobs(hidden, weight, targets, temperature, chunk=chunk)
    ref = linear_logprobs_reference(hidden, weight, targets, temperature)
    assert torch.allclose(ours, ref, rtol=tol, atol=tol)
    g_ours = torch.autograd.grad(ours, (hidden, weight), grad.to(ours.dtype))
    g_ref = torch.autograd.grad(ref, (hidden, weight), grad.to(ref.dtype))
    g_ours = [g.to(ref.dtype) for g in g_ours]
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=tol * 10, atol=tol * 10)


def test_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=gen)
    weight = torch.randn(50, 32, generator=gen) * 0.2
    targets = torch.randint(0, 50, (40,), generator=gen)
    ours = linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, chunk=16)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    assert ((ours.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_cross_entropy_matches_transformers_loss():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(23, 16, generator=gen)
    labels = torch.randint(0, 23, (2, 9), generator=gen)
    labels[0, :3] = -100
    ref = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=23)
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels), ref, rtol=1e-5)
    ref_sum = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=23, num_items_in_batch=torch.tensor(40))
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels, num_items_in_batch=40), ref_sum, rtol=1e-5)


@pytest.mark.parametrize("chunk,temperature", [(7, 1.0), (64, 0.7)])
def test_entropy_matches_reference_and_leaves_the_gradient_alone(chunk, temperature):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 25, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 25), generator=gen)
    logp, entropy = linear_logprobs_entropy(hidden, weight, targets, temperature, chunk=chunk)
    assert entropy.shape == targets.shape and not entropy.requires_grad
    ref = entropy_reference(hidden.detach().reshape(-1, 16), weight.detach(), temperature).view(2, 25)
    torch.testing.assert_close(entropy, ref, rtol=1e-10, atol=1e-10)
    plain = linear_logprobs(hidden, weight, targets, temperature, chunk=chunk)
    torch.testing.assert_close(logp, plain)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    for a, b in zip(grads, torch.autograd.grad(plain.sum(), (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast")
def test_backward_under_autocast_with_mixed_dtypes():
    """float32 hidden states and a bf16 head, reconciled by autocast in the forward (as under DDP with
    bf16 mixed precision): the backward meets the same casts and matches the float32 reference."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 32, generator=gen).cuda().requires_grad_()
    weight = (torch.randn(300, 32, generator=gen) / 6).cuda().bfloat16()
    targets = torch.randint(0, 300, (40,), generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp = linear_logprobs(hidden, weight, targets, chunk=16)
    logp.sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    linear_logprobs_reference(ref_hidden, weight.float(), targets).sum().backward()
    assert torch.linalg.norm(hidden.grad - ref_hidden.grad) < 0.05 * torch.linalg.norm(ref_hidden.grad)


@pytest.mark.parametrize("chunk", [5, 64])
def test_nll_sum_gradients_from_the_forward_match_reference(chunk):
    """linear_nll_sum's gradients (taken in the forward, scaled by the incoming gradient in backward)
    against the plain logits path in float64, for the hidden states and a trainable head."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(41, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 41, (30,), generator=gen)
    total = linear_nll_sum(hidden, weight, targets, chunk=chunk)
    ref = -linear_logprobs_reference(hidden, weight, targets).sum()
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=0)
    ours = torch.autograd.grad(total * 2.5, (hidden, weight))
    want = torch.autograd.grad(ref * 2.5, (hidden, weight))
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    frozen = linear_nll_sum(hidden, weight.detach(), targets, chunk=chunk)
    (only_hidden,) = torch.autograd.grad(frozen * 2.5, hidden)
    torch.testing.assert_close(only_hidden, want[0], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_nll_sum(hidden, weight, targets, chunk=chunk), ref.detach())


def test_cross_entropy_backward_multiplies_no_lm_head():
    """The causal-LM loss takes its gradient in the forward: backward runs no matrix product (the LM
    head, [tokens, vocab], is multiplied in the forward only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(23, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 23, (2, 9), generator=gen)
    loss = linear_cross_entropy(hidden, weight, labels)
    with Products() as products:
        loss.backward()
    assert products.count == 0 and hidden.grad is not None and weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast")
def test_cross_entropy_under_autocast_with_mixed_dtypes():
    """The SFT loss with float32 hidden states and a bf16 head under autocast (gradients taken in the
    forward's autocast state): its value and hidden-state gradient match the float32 reference."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 20, 32, generator=gen).cuda().requires_grad_()
    weight = (torch.randn(300, 32, generator=gen) / 6).cuda().bfloat16()
    labels = torch.randint(0, 300, (2, 20), generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = ForCausalLMLoss(ref_hidden @ weight.float().T, labels, vocab_size=300)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=0)
    assert torch.linalg.norm(hidden.grad - ref_hidden.grad) < 0.05 * torch.linalg.norm(ref_hidden.grad)


@pytest.mark.parametrize("vocab,temperature", [(37, 1.0), (300, 0.7), (5000, 1.3)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_stats_kernel_matches_reference(vocab, temperature, with_entropy):
    pytest.importorskip("triton")
    from align.kernels.linear_logprob import logits_stats_reference, row_stats_triton

    gen = torch.Generator().manual_seed(vocab)
    for dtype in DTYPES:
        logits = (torch.randn(6, vocab, generator=gen) * 4).to(DEVICE, dtype)
        t = torch.randint(0, vocab, (6,), generator=gen).to(DEVICE)
        ours = row_stats_triton(logits, t, temperature, with_entropy)
        ref = logits_stats_reference(logits, t, temperature, with_entropy)
        for a, b in zip(ours, ref, strict=True):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab,temperature", [(37, 1.0), (300, 0.7), (5000, 1.3)])
@pytest.mark.parametrize("scaled", [False, True])
def test_row_grad_kernel_matches_reference(vocab, temperature, scaled):
    pytest.importorskip("triton")
    from align.kernels.linear_logprob import logits_grad_reference, logits_stats_reference, row_grad_triton

    gen = torch.Generator().manual_seed(vocab + 1)
    for dtype in DTYPES:
        logits = (torch.randn(6, vocab, generator=gen) * 4).to(DEVICE, dtype)
        t = torch.randint(0, vocab, (6,), generator=gen).to(DEVICE)
        scale = torch.randn(6, generator=gen).to(DEVICE) if scaled else None
        lse = logits_stats_reference(logits, t, temperature)[0]
        ref = logits_grad_reference(logits, t, lse, scale, temperature, torch.float32)
        ours = row_grad_triton(logits.clone(), t, lse, scale, temperature)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref, rtol=1e-2, atol=2e-3 if dtype != torch.float32 else 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the row kernels inside the autograd functions: CUDA")
def test_kernel_path_of_nll_and_logprobs_matches_the_reference_path():
    from align.kernels.dispatch import use_triton

    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(300, 64, generator=gen)).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(5000, 64, generator=gen) / 8).cuda().bfloat16()
    targets = torch.randint(0, 5000, (300,), generator=gen).cuda()
    results = []
    for on in (True, False):
        with use_triton(on):
            nll = linear_nll_sum(hidden, weight, targets, chunk=128)
            (g_nll,) = torch.autograd.grad(nll, hidden)
            logp, ent = linear_logprobs_entropy(hidden, weight, targets, 0.8, chunk=128)
            (g_lp,) = torch.autograd.grad(logp.sum(), hidden)
        results.append([t.float() for t in (nll, g_nll, logp, ent, g_lp)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="addmm's float32 output: CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_product_accumulates_16bit_products_inside_the_gemm(dtype):
    """The LM head's weight gradient, chunk by chunk: acc += grad_logits.T @ h with the float32 sum kept
    inside the GEMM (the fused path must be the one that runs here), against float64."""
    from align.kernels.linear_logprob import _addmm_accumulates, add_product_

    assert _addmm_accumulates(torch.device("cuda", torch.cuda.current_device()), dtype)
    gen = torch.Generator().manual_seed(11)
    acc = torch.randn(300, 32, generator=gen).cuda()
    want = acc.double()
    for _ in range(3):
        grad_logits, h = (torch.randn(64, n, generator=gen).cuda().to(dtype) for n in (300, 32))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            add_product_(acc, grad_logits.T, h)
        want += grad_logits.double().T @ h.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)
