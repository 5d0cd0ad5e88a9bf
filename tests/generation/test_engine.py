"""Engine behaviour: n samples share one prefill, continuous batching, cache layout, bad input."""

from __future__ import annotations

import pytest
import torch

import align.generation.engine as engine_module
from align.generation import CacheError, GenerationEngine, LatentCache, generate
from align.models import build_model, preset_config

from .conftest import full_logits

PROMPTS = [[0, 11, 12, 13, 14], [0, 40], [0, 7, 8, 9, 10, 11, 12], [5]]


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=3).eval()


@pytest.fixture
def prefill_calls(monkeypatch):
    calls = []
    real = engine_module.prefill

    def counting(model, cache, ids, positions, slots, documents, routing=None):
        calls.append((ids.numel(), documents))
        return real(model, cache, ids, positions, slots, documents, routing)

    monkeypatch.setattr(engine_module, "prefill", counting)
    return calls


def test_n_samples_share_one_prefill(tiny, prefill_calls):
    results = generate(tiny, PROMPTS, max_new_tokens=5, temperature=1.0, n=4, seed=0)
    prompt_tokens = sum(len(p) - 1 for p in PROMPTS)  # the last prompt token goes through decode
    assert sum(tokens for tokens, _ in prefill_calls) == prompt_tokens
    assert sum(docs for _, docs in prefill_calls) == sum(len(p) > 1 for p in PROMPTS)
    assert [len(row) for row in results] == [4] * len(PROMPTS)
    for prompt, row in zip(PROMPTS, results, strict=True):
        assert len({tuple(c.token_ids) for c in row}) > 1  # independent draws
        for completion in row:
            logits = full_logits(tiny, prompt, completion.token_ids)
            expected = logits.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=2e-5)


def test_greedy_samples_identical_and_independent_of_slots(tiny):
    single = generate(tiny, PROMPTS, max_new_tokens=6, temperature=0)
    # fewer slots than samples: later samples copy the prompt rows from a live sibling, or re-prefill
    for max_batch, refill_every in ((3, 1), (2, 4), (16, 8)):
        grouped = generate(
            tiny, PROMPTS, max_new_tokens=6, temperature=0, n=3, max_batch=max_batch, refill_every=refill_every
        )
        for [alone], row in zip(single, grouped, strict=True):
            assert all(c.token_ids == alone.token_ids for c in row)


def test_continuous_batching_ragged_lengths(tiny):
    """Rows stop at different steps (EOS); with 2 slots the queue must drain through refills."""
    prompts = [[0, 3 + i, 9, 2 * i + 1] for i in range(7)]
    free = generate(tiny, prompts, max_new_tokens=12, temperature=0)
    eos = free[0][0].token_ids[2]
    results = generate(tiny, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos, max_batch=2,
                       refill_every=2)
    lengths = set()
    for [alone], [completion] in zip(free, results, strict=True):
        ids = alone.token_ids
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert completion.token_ids == ids[:cut]
        lengths.add(len(completion.token_ids))
    assert len(lengths) > 1


def test_engine_reuses_buffers_across_calls(tiny):
    engine = GenerationEngine(tiny, max_batch=4)
    first = engine.generate(PROMPTS, max_new_tokens=4, temperature=0)
    cache = engine.cache
    second = engine.generate(PROMPTS, max_new_tokens=4, temperature=0)
    assert engine.cache is cache
    assert [[c.token_ids for c in r] for r in first] == [[c.token_ids for c in r] for r in second]
    engine.release()
    assert engine.cache is None


def test_training_mode_restored(tiny):
    tiny.train()
    try:
        generate(tiny, PROMPTS[:1], max_new_tokens=2, temperature=0)
        assert tiny.training
    finally:
        tiny.eval()


def test_cache_holds_only_the_latent():
    config = preset_config("deepseek-v2-lite")
    cache = LatentCache.for_model(config, slots=2, max_len=3, dtype=torch.bfloat16, device="meta")
    assert cache.data.shape == (27, 2, 3, 576)
    assert cache.bytes_per_token() == 27 * 576 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_token_ids": []}, "is empty"),
        ({"prompt_token_ids": [[1, 2], []]}, r"prompt_token_ids\[1\] is empty"),
        ({"prompt_token_ids": "hello"}, "expected a list"),
        ({"prompt_token_ids": [[1, 5000]]}, "outside the vocabulary"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"n": 0}, "n=0"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"eos_token_id": 4096}, "eos_token_id"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_input_is_rejected(tiny, kwargs, message):
    args = {"prompt_token_ids": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny, args.pop("prompt_token_ids"), **args)


def test_prompt_longer_than_cache(tiny):
    engine = GenerationEngine(tiny, max_len=16)
    engine.generate([[1] * 10], max_new_tokens=7, temperature=0)  # 10 + 7 - 1 = 16 positions: fits
    with pytest.raises(CacheError, match=r"prompt_token_ids\[1\] has 20 tokens.*max_len=16"):
        engine.generate([[1] * 3, [1] * 20], max_new_tokens=2)
    with pytest.raises(CacheError, match="needs 17 cache positions"):
        engine.generate([[1] * 10], max_new_tokens=8)


def test_wrong_model_and_settings_rejected(tiny):
    with pytest.raises(TypeError, match="DeepseekV2ForCausalLM"):
        generate(torch.nn.Linear(2, 2), [[1]], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_batch"):
        GenerationEngine(tiny, max_batch=0)
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        GenerationEngine(tiny, cuda_graphs=True)
