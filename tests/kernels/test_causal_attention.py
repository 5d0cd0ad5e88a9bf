"""Causal attention over whole rows: cuDNN's kernel (Hopper, 16-bit) against SDPA in float32, forward and
backward, on MLA's head sizes and the strided q, k, v that MLA's cat / split make; compiled = eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.kernels.causal_attention import causal_attention, causal_attention_reference, cudnn_causal_ready

HEADS, NOPE, ROPE, V = 4, 128, 64, 128


def mla_like(batch, seq, device, dtype, seed=0):
    """q, k [B, h, S, 192], v [B, h, S, 128] as views of [B, S, h, ...] tensors (MLA's layouts), and the leaves."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(batch, seq, HEADS, NOPE + V, generator=gen).to(device, dtype).requires_grad_()
    q = torch.randn(batch, seq, HEADS, NOPE + ROPE, generator=gen).to(device, dtype).requires_grad_()
    k_pe = torch.randn(batch, seq, 1, ROPE, generator=gen).to(device, dtype).requires_grad_()
    k_nope, v = kv.split([NOPE, V], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, HEADS, -1)], dim=-1)  # [B, S, h, 192]
    return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), (q, kv, k_pe)


def grads(out, leaves, seed=1):
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return torch.autograd.grad(out, leaves, upstream)


def test_reference_is_sdpa_causal_and_cpu_takes_it():
    (q, k, v), _ = mla_like(2, 9, "cpu", torch.float32)
    assert not cudnn_causal_ready(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(9, 9, dtype=torch.bool).tril(), scale=0.2)
    torch.testing.assert_close(causal_attention(q, k, v, 0.2), want)
    torch.testing.assert_close(causal_attention_reference(q, k, v, 0.2), want)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_readiness_checks_keep_one_compiled_graph(mode, request):
    """The checks run inside compiled decoder layers: a graph break there gave wrong gradients under full
    checkpointing (issue 14's H200 run), so they must trace (fullgraph), in deterministic mode too."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    (q, k, v), _ = mla_like(1, 8, "cpu", torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: causal_attention(q, k, v, 0.2), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), causal_attention_reference(q, k, v, 0.2))


def _cudnn_here() -> bool:
    if not torch.cuda.is_available():
        return False
    t = torch.empty(1, 1, 8, 192, device="cuda", dtype=torch.bfloat16)
    return cudnn_causal_ready(t, t, t[..., :128])


@pytest.mark.skipif(not _cudnn_here(), reason="cuDNN's attention path needs a Hopper-class GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "seq"), [(2, 1000), (1, 4096)])
def test_cudnn_matches_float32_reference(dtype, batch, seq):
    (q, k, v), leaves = mla_like(batch, seq, "cuda", dtype)
    scale = 0.1147  # not 1/sqrt(192): the scale must reach the kernel
    out = causal_attention(q, k, v, scale)
    assert out.shape == (batch, HEADS, seq, V)
    ref = causal_attention_reference(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads(out, leaves), grads(ref, leaves), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not _cudnn_here(), reason="cuDNN's attention path needs a Hopper-class GPU")
def test_cudnn_compiled_equals_eager():
    (q, k, v), leaves = mla_like(2, 512, "cuda", torch.bfloat16)
    eager = causal_attention(q, k, v, 0.1)

    def attend(q, kv, k_pe):
        k_nope, v = kv.split([NOPE, V], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, HEADS, -1)], dim=-1)
        return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.1)

    compiled = torch.compile(attend, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(grads(compiled, leaves), grads(eager, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not _cudnn_here(), reason="cuDNN's attention path needs a Hopper-class GPU")
def test_deterministic_mode_leaves_cudnn(deterministic):
    (q, k, v), _ = mla_like(1, 64, "cuda", torch.bfloat16)
    assert not cudnn_causal_ready(q, k, v)
