"""Latent-cache decode against full forwards and against transformers' own generate (float32)."""

from __future__ import annotations

import pytest
import torch

from align.generation import LatentCache, generate
from align.generation.forward import decode_logits
from tests.models.cases import CASES

from .conftest import full_logits, prefill_prompts

# Ragged, one of length 1, one beyond the YaRN original context (32) of the test configs.
PROMPTS = [
    [3, 5, 7, 9, 11, 2, 4], [8], [10 + i for i in range(34)], [60, 61, 62], [1, 1, 2, 3, 5, 8, 13, 21, 34],
]
NEW = 10


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_full_forward_argmax(case, case_models):
    _, ours = case_models(case)
    # 2 slots for 5 prompts: finished rows are refilled (continuous batching) mid-run.
    results = generate(ours, PROMPTS, max_new_tokens=NEW, temperature=0, max_batch=2, refill_every=3)
    for prompt, [completion] in zip(PROMPTS, results, strict=True):
        assert len(completion.token_ids) == NEW and completion.finish_reason == "length"
        logits = full_logits(ours, prompt, completion.token_ids)
        assert logits.argmax(-1).tolist() == completion.token_ids
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(case, case_models):
    ref, ours = case_models(case)
    prompts = PROMPTS[:3]
    results = generate(ours, prompts, max_new_tokens=NEW, temperature=0)
    for prompt, [completion] in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                eos_token_id=None, pad_token_id=0,
            )
        assert out[0, len(prompt):].tolist() == completion.token_ids


@pytest.mark.parametrize("case", list(CASES))
def test_decode_step_logits_equal_full_forward(case, case_models):
    """Teacher-forced decode over 3 slots (ragged prompts, packed prefill) vs full-forward logits."""
    _, ours = case_models(case)
    gen = torch.Generator().manual_seed(0)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    follow = [torch.randint(0, ours.config.vocab_size, (6,), generator=gen).tolist() for _ in prompts]
    cache = LatentCache.for_model(ours.config, slots=3, max_len=48, dtype=torch.float32, device="cpu")
    prefill_prompts(ours, cache, prompts)

    tokens = torch.tensor([p[-1] for p in prompts])
    pos = torch.tensor([len(p) - 1 for p in prompts])
    with torch.no_grad():
        for step in range(len(follow[0])):
            logits = decode_logits(ours, cache, tokens, pos, attend_len=48)  # [3, V]
            for s, prompt in enumerate(prompts):
                ref = full_logits(ours, prompt, follow[s][: step + 1])[step]
                scale = ref.abs().max()
                assert (logits[s] - ref).abs().max() / scale <= 1e-5, (case, s, step)
            tokens = torch.tensor([f[step] for f in follow])
            pos = pos + 1


@pytest.mark.parametrize("case", ["v2_lite", "v3_noaux"])
def test_transformers_generate_on_our_model_uses_its_cache_and_equals_the_engine(case, case_models):
    """GenerationMixin.generate (the path TRL takes) hands our model its cache under the installed
    transformers' name (`cache` from 5.24, `past_key_values` before): after the prompt every forward
    sees one new token, and the greedy tokens equal align's engine."""
    _, ours = case_models(case)
    seen: list[int] = []

    def record(_module, args, kwargs):
        seen.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1])

    hook = ours.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for prompt in PROMPTS[:3]:
            seen.clear()
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = ours.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                    eos_token_id=None, pad_token_id=0)
            assert seen[0] == len(prompt) and set(seen[1:]) == {1}, seen
            [[completion]] = generate(ours, [prompt], max_new_tokens=NEW, temperature=0)
            assert out[0, len(prompt):].tolist() == completion.token_ids
    finally:
        hook.remove()
