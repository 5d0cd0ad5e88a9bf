"""One-pass sampler kernel against its PyTorch reference and the token choice of align.generation.sampling."""

from __future__ import annotations

import pytest
import torch

from align.generation.sampling import SamplingParams, choose
from align.kernels.sample_rows import _sample_rows_triton, sample_rows_reference
from tests.kernels.conftest import DEVICE


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("vocab", [5000, 2048, 37])
def test_sample_rows_matches_choose(temperature, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(6, vocab, generator=gen)).to(DEVICE)
    uniform = torch.rand(6, vocab, generator=gen).to(DEVICE)
    token, logprob = _sample_rows_triton(logits, uniform, temperature)
    with torch.device("cpu"):
        ref_token, ref_logprob = choose(logits.cpu(), SamplingParams(temperature), uniform.cpu())
    assert token.dtype == torch.long and logprob.dtype == torch.float32
    assert torch.equal(token.cpu(), ref_token)
    assert torch.equal(sample_rows_reference(logits.cpu(), uniform.cpu(), temperature)[0], ref_token)
    torch.testing.assert_close(logprob.cpu(), ref_logprob, rtol=1e-5, atol=1e-5)


def test_sample_rows_ties_pick_the_first_index_and_bf16_logits():
    logits = torch.zeros(2, 3000, device=DEVICE)
    logits[0, [7, 2100, 2900]] = 5.0
    logits[1, [2500, 40]] = 9.0
    token, logprob = _sample_rows_triton(logits, None, 0.0)
    assert token.tolist() == [7, 40]
    ref = logits.float().log_softmax(-1)
    torch.testing.assert_close(logprob, ref[[0, 1], [7, 40]], rtol=1e-5, atol=1e-5)
    if DEVICE == "cuda":
        half = logits.to(torch.bfloat16)
        assert torch.equal(_sample_rows_triton(half, None, 0.0)[0], token)


@pytest.mark.parametrize("vocab", [5000, 37])
def test_keyed_noise_is_hashed_in_the_kernel_as_in_the_reference(vocab):
    from align.generation.sampling import keyed_noise, vocab_hashes
    from align.kernels.sample_rows import KeyedNoise

    gen = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(6, vocab, generator=gen)).to(DEVICE)
    keys = torch.tensor([0, 1, 2**32 - 1, 77, 12345, 3]).to(DEVICE)
    noise = keyed_noise(keys, torch.tensor([0, 5, 9, 1, 2, 2**20]).to(DEVICE), vocab_hashes(vocab, DEVICE))
    assert isinstance(noise, KeyedNoise)
    for temperature in (1.0, 0.7):
        token, logprob = _sample_rows_triton(logits, noise, temperature)
        ref_token, ref_logprob = sample_rows_reference(logits.cpu(), noise.uniform().cpu(), temperature)
        assert torch.equal(token.cpu(), ref_token)
        torch.testing.assert_close(logprob.cpu(), ref_logprob, rtol=1e-5, atol=1e-5)
    u = noise.uniform()
    assert 0 < u.min() and u.max() < 1 and u.shape == (6, vocab)
