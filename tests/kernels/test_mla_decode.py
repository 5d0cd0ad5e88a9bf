"""MLA decode kernels against their PyTorch references (interpreter on CPU, GPU when present)."""

from __future__ import annotations

import pytest
import torch

from align.kernels.mla_decode import (
    _latent_attention_triton,
    _write_latent_triton,
    latent_attention,
    latent_attention_reference,
    write_latent_reference,
)
from tests.kernels.conftest import DEVICE, DTYPES

# (heads, kv_rank, rope_dim): V2-Lite's attention shape, and tiny ones that need padded blocks
SHAPES = [(16, 512, 64), (3, 24, 8), (2, 32, 16)]


def _cos_sin(batch: int, rope: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(batch, rope // 2, generator=gen) * 6.28
    return angle.cos().to(DEVICE), angle.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,rank,rope", SHAPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_write_latent_matches_reference(dtype, heads, rank, rope, interleaved):
    gen = torch.Generator().manual_seed(rank + rope)
    batch, slots, length = 5, 7, 9
    kv = torch.randn(batch, rank + rope, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(rank, generator=gen)).to(DEVICE, dtype)
    cos, sin = _cos_sin(batch, rope, gen)
    positions = torch.tensor([0, 8, 3, 3, 5], device=DEVICE)
    ours = torch.zeros(slots, length, rank + rope, dtype=dtype, device=DEVICE)
    ref = ours.clone()
    _write_latent_triton(kv, weight, 1e-6, cos, sin, ours, positions, interleaved)
    write_latent_reference(kv, weight, 1e-6, cos, sin, ref, positions, interleaved)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    assert ours[batch:].abs().sum() == 0  # other slots untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,rank,rope", SHAPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_latent_attention_matches_reference(dtype, heads, rank, rope, interleaved):
    gen = torch.Generator().manual_seed(heads * rank)
    batch, length = 4, 70  # several key blocks, the last one partial
    q_latent = torch.randn(batch, heads, rank, generator=gen).to(DEVICE, dtype)
    q_pe = torch.randn(batch, heads, rope, generator=gen).to(DEVICE, dtype)
    rows = torch.randn(batch + 2, length, rank + rope, generator=gen).to(DEVICE, dtype)
    cos, sin = _cos_sin(batch, rope, gen)
    positions = torch.tensor([0, 69, 31, 40], device=DEVICE)
    scale = (rank + rope) ** -0.5
    ours = _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, scale, interleaved)
    ref = latent_attention_reference(q_latent, q_pe, cos, sin, rows, positions, scale, interleaved)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol)


def test_latent_attention_ignores_rows_past_position():
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[0]
    q_latent = torch.randn(2, 2, 32, generator=gen).to(DEVICE, dtype)
    q_pe = torch.randn(2, 2, 16, generator=gen).to(DEVICE, dtype)
    rows = torch.randn(2, 40, 48, generator=gen).to(DEVICE, dtype)
    cos, sin = _cos_sin(2, 16, gen)
    positions = torch.tensor([5, 20], device=DEVICE)
    before = _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, 0.1, True)
    rows[0, 6:] = float("nan")
    rows[1, 21:] = float("nan")
    after = _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, 0.1, True)
    assert torch.equal(before, after)


def test_strided_output_and_bad_layout():
    gen = torch.Generator().manual_seed(1)
    dtype = DTYPES[0]
    q_latent = torch.randn(3, 2, 32, generator=gen).to(DEVICE, dtype)
    q_pe = torch.randn(3, 2, 16, generator=gen).to(DEVICE, dtype)
    rows = torch.randn(3, 8, 48, generator=gen).to(DEVICE, dtype)
    cos, sin = _cos_sin(3, 16, gen)
    positions = torch.tensor([1, 7, 4], device=DEVICE)
    out = torch.empty(2, 3, 32, dtype=dtype, device=DEVICE).transpose(0, 1)  # [B, h, R] as [h, B, R]
    _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, 0.2, True, out=out)
    assert torch.equal(out, _latent_attention_triton(q_latent, q_pe, cos, sin, rows, positions, 0.2, True))
    with pytest.raises(ValueError, match="q_latent needs a contiguous last dimension"):
        _latent_attention_triton(q_latent.transpose(1, 2), q_pe, cos, sin, rows, positions, 0.2, True)


def test_public_op_takes_the_reference_on_cpu_and_fills_out():
    gen = torch.Generator().manual_seed(2)
    q_latent, q_pe = torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 16, generator=gen)
    rows = torch.randn(3, 8, 48, generator=gen)
    cos, sin = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    positions = torch.tensor([1, 7, 4])
    ref = latent_attention_reference(q_latent, q_pe, cos, sin, rows, positions, 0.2, True)
    out = torch.empty(2, 3, 32).transpose(0, 1)
    assert latent_attention(q_latent, q_pe, cos, sin, rows, positions, 0.2, True, out=out) is out
    assert torch.equal(out, ref)
