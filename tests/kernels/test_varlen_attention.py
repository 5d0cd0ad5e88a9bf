"""Causal attention within segments (no dense mask) against SDPA under the dense per-document mask.

The reference runs on CPU and GPU; the FlashAttention varlen path runs where CUDA is, in bf16/fp16,
forward and backward, at MLA's 192 q·k / 128 v head sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.kernels.varlen_attention import _flash, flash_varlen_ready, varlen_attention_reference
from align.models.layout import attention_mask_for, document_ids, segments_for

LENGTHS = [5, 1, 17, 9]  # one packed row of four documents


def packed_inputs(lengths, heads, qk, vd, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, d, generator=gen).to(device, dtype).requires_grad_()
               for d in (qk, qk, vd))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)  # [1, S]
    return q, k, v, positions


def masked(q, k, v, positions, scale):
    """SDPA over one [1, h, S, d] row with the dense document mask (the model's CPU path)."""
    mask = attention_mask_for(document_ids(positions), None, positions.shape[1], positions.device)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [S, h, vd]


def grads(out, tensors, seed=1):
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("heads,qk,vd", [(2, 24, 16), (2, 192, 128)])
def test_reference_matches_dense_mask(heads, qk, vd):
    q, k, v, positions = packed_inputs(LENGTHS, heads, qk, vd, "cpu", torch.float64)
    cu = segments_for(document_ids(positions), None, 1, positions.shape[1], positions.device).cu_seqlens
    assert cu.tolist() == [0, 5, 6, 23, 32]
    out, ref = varlen_attention_reference(q, k, v, cu, 0.3), masked(q, k, v, positions, 0.3)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


def test_segments_skip_padding_and_keep_holes_inside_a_document():
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 0]])
    seg = segments_for(doc_ids, valid, 2, 6, torch.device("cpu"))
    assert seg.keep.tolist() == [0, 1, 2, 3, 4, 7, 8, 10]
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 8] and seg.max_len == 3  # row 1's hole does not split it
    plain = segments_for(None, None, 2, 6, torch.device("cpu"))
    assert plain.keep is None and plain.cu_seqlens.tolist() == [0, 6, 12]


def test_padding_at_row_ends_is_segments_of_its_own():
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 2]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]])  # right, left, between docs
    seg = segments_for(doc_ids, valid, 3, 6, torch.device("cpu"))
    assert seg.keep is None and seg.max_len == 4
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12, 14, 15, 18]


@pytest.mark.parametrize("valid", [[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0]])
def test_any_hole_keeps_the_real_tokens_alone(valid):
    seg = segments_for(torch.ones(1, 6, dtype=torch.long), torch.tensor([valid]), 1, 6, torch.device("cpu"))
    assert seg.keep.tolist() == [i for i, v in enumerate(valid) if v]
    assert seg.cu_seqlens.tolist() == [0, sum(valid)]


def test_end_padding_segments_give_the_real_tokens_the_same_attention():
    """Padding as segments of its own (keep None) vs the real tokens gathered: equal on every real token."""
    gen = torch.Generator().manual_seed(0)
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    q, k = (torch.randn(16, 2, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(16, 2, 16, generator=gen, dtype=torch.float64)
    seg = segments_for(doc_ids, valid, 2, 8, torch.device("cpu"))
    assert seg.keep is None
    out = varlen_attention_reference(q, k, v, seg.cu_seqlens, 0.3)
    real = valid.reshape(-1).nonzero().squeeze(1)
    owner = (doc_ids + torch.arange(2)[:, None] * 9).reshape(-1)[real]
    cu = torch.cat([torch.tensor([0]), (owner[1:] != owner[:-1]).nonzero().squeeze(1) + 1, torch.tensor([16 - 4])])
    ref = varlen_attention_reference(q[real], k[real], v[real], cu, 0.3)
    torch.testing.assert_close(out[real], ref, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlashAttention varlen kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [LENGTHS, [700, 1300, 96, 2000]])
def test_flash_matches_reference(dtype, lengths):
    q, k, v, positions = packed_inputs(lengths, 16, 192, 128, "cuda", dtype)
    assert flash_varlen_ready(q)
    seg = segments_for(document_ids(positions), None, 1, positions.shape[1], positions.device)
    scale = 0.1147  # not 1/sqrt(192): the scale must reach the kernel
    out = _flash(q, k, v, seg.cu_seqlens, seg.max_len, scale)
    ref = varlen_attention_reference(*(t.float() for t in (q, k, v)), seg.cu_seqlens, scale)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
