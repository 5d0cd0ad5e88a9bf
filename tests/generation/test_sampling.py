"""Sampling: truncation never emits excluded tokens, draws follow the distribution, seeds repeat,
returned log-probabilities are log_softmax(logits / temperature) at the chosen tokens."""

from __future__ import annotations

import pytest
import torch

from align.generation import SamplingParams, generate
from align.generation.sampling import choose, truncate
from align.models import build_model

from .conftest import full_logits


def draws(logits: torch.Tensor, params: SamplingParams, rows: int = 20000, seed: int = 0) -> torch.Tensor:
    batch = logits.expand(rows, -1)  # [rows, V]
    uniform = torch.rand(batch.shape, generator=torch.Generator().manual_seed(seed))
    token, _ = choose(batch, params, uniform)
    return token


def test_top_k_and_top_p_never_emit_excluded_tokens():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    probs = logits.softmax(-1)[0]
    assert draws(logits, SamplingParams(1.0, 1.0, 3)).unique().tolist() == [0, 1, 2]
    # nucleus 0.7: tokens 0 and 1 hold 0.51 of the mass, token 2 takes it past 0.7
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    assert draws(logits, SamplingParams(1.0, 0.7, 0)).unique().tolist() == [0, 1, 2]
    assert draws(logits, SamplingParams(1.0, 0.7, 2)).unique().tolist() == [0, 1]
    assert draws(logits, SamplingParams(1.0, 1e-6, 0)).unique().tolist() == [0]  # top token always kept


def test_draws_follow_the_truncated_tempered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    params = SamplingParams(0.8, 0.9, 5)
    expected = truncate(logits / 0.8, 5, 0.9).softmax(-1)[0]
    tokens = draws(logits, params, rows=40000)
    freq = torch.bincount(tokens, minlength=8).float() / tokens.numel()
    assert (freq - expected).abs().max() < 0.01
    assert freq[expected == 0].sum() == 0


def test_greedy_and_logprob_definition():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    token, logprob = choose(logits, SamplingParams(0.0), None)
    assert torch.equal(token, logits.argmax(-1))
    torch.testing.assert_close(logprob, logits.log_softmax(-1).gather(1, token[:, None])[:, 0])
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(2))
    token, logprob = choose(logits, SamplingParams(0.7, 0.5, 10), uniform)
    expected = (logits / 0.7).log_softmax(-1).gather(1, token[:, None])[:, 0]  # before truncation
    torch.testing.assert_close(logprob, expected)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=7).eval()


PROMPTS = [[0, 11, 12, 13], [0, 40], [0, 7, 8, 9, 10, 11, 12]]


def test_seeded_sampling_repeats_and_logprobs_match(tiny):
    kwargs = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, "n": 2, "max_batch": 4, "refill_every": 2}
    first = generate(tiny, PROMPTS, seed=11, **kwargs)
    again = generate(tiny, PROMPTS, seed=11, **kwargs)
    other = generate(tiny, PROMPTS, seed=12, **kwargs)
    ids = lambda res: [[c.token_ids for c in row] for row in res]
    assert ids(first) == ids(again)
    assert [[c.logprobs for c in row] for row in first] == [[c.logprobs for c in row] for row in again]
    assert ids(first) != ids(other)
    for prompt, row in zip(PROMPTS, first, strict=True):
        for completion in row:
            logits = full_logits(tiny, prompt, completion.token_ids)
            expected = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=2e-5)


def test_engine_top_k_only_emits_top_k_tokens(tiny):
    results = generate(tiny, PROMPTS, max_new_tokens=6, temperature=2.0, top_k=3, n=4, seed=0)
    for prompt, row in zip(PROMPTS, results, strict=True):
        for completion in row:
            top3 = full_logits(tiny, prompt, completion.token_ids).topk(3, dim=-1).indices  # [C, 3]
            assert (top3 == torch.tensor(completion.token_ids)[:, None]).any(-1).all()


def test_eos_and_stop_ids_end_rows_and_are_kept(tiny):
    [[free]] = generate(tiny, [PROMPTS[0]], max_new_tokens=8, temperature=0)
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    [[stopped]] = generate(tiny, [PROMPTS[0]], max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-6)
    stop = free.token_ids[5]
    [[by_stop]] = generate(tiny, [PROMPTS[0]], max_new_tokens=8, temperature=0, eos_token_id=[999],
                           stop_token_ids=[stop])
    assert by_stop.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]
    assert free.finish_reason == "length"


def test_completions_do_not_depend_on_batching_or_order(tiny):
    """Noise is keyed per sequence (seed, prompt key, sample, position): a prompt's completions are the same
    whether it is generated alone, in another order, in other slot counts, or as a shard with its keys."""
    from align.generation import GenerationEngine

    kwargs = {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 5}
    ids = lambda res: [[c.token_ids for c in row] for row in res]
    whole = ids(GenerationEngine(tiny, max_batch=9).generate(PROMPTS, **kwargs))
    small = ids(GenerationEngine(tiny, max_batch=2, refill_every=1).generate(PROMPTS, **kwargs))
    assert small == whole
    order = [2, 0, 1]
    shuffled = GenerationEngine(tiny).generate([PROMPTS[i] for i in order], prompt_keys=order, **kwargs)
    assert ids(shuffled) == [whole[i] for i in order]
    engine = GenerationEngine(tiny, max_batch=3)
    shards = [ids(engine.generate(PROMPTS[a:b], prompt_keys=list(range(a, b)), **kwargs)) for a, b in ((0, 1), (1, 3))]
    assert shards[0] + shards[1] == whole
    assert len({tuple(c) for row in whole for c in row}) > 1  # the samples of a prompt differ


def test_keyed_uniform_is_uniform_and_one_hash_for_ints_and_tensors():
    from align.generation.sampling import keyed_uniform, mix32, vocab_hashes

    values = [0, 1, 12345, 2**32 - 1]
    assert mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    u = keyed_uniform(torch.arange(64), torch.full((64,), 3), vocab_hashes(1000, "cpu"))
    assert u.shape == (64, 1000) and u.dtype == torch.float32
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    again = keyed_uniform(torch.arange(64), torch.full((64,), 4), vocab_hashes(1000, "cpu"))
    assert (u != again).float().mean() > 0.99  # the next position draws afresh
