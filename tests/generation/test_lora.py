"""PEFT adapters are live in generation: decode equals the full forward of the PEFT model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from align.generation import GenerationEngine, LatentCache, generate
from align.generation.forward import decode_logits, prefill
from align.models import build_model
from align.models.adapters import effective_weight

from .conftest import full_logits

PROMPTS = [[0, 21, 22, 23, 24], [0, 50], [0, 7, 8, 9, 10, 11, 12, 13]]
TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(seed: int = 5, **config):
    model = build_model("tiny", seed=seed).eval()
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapters matter
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return wrapped.eval()


@pytest.fixture(scope="module")
def lora():
    return peft_model(target_modules=TARGETS)


def check_greedy(model, results, prompts=PROMPTS):
    for prompt, [completion] in zip(prompts, results, strict=True):
        logits = full_logits(model, prompt, completion.token_ids)
        assert logits.argmax(-1).tolist() == completion.token_ids
        expected = logits.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=2e-5)


def test_lora_greedy_equals_peft_full_forward(lora):
    results = generate(lora, PROMPTS, max_new_tokens=8, temperature=0, max_batch=2)
    check_greedy(lora, results)
    with lora.disable_adapter():
        base = generate(lora, PROMPTS, max_new_tokens=8, temperature=0)
        check_greedy(lora, base)
    assert [r[0].token_ids for r in results] != [r[0].token_ids for r in base]


def test_lora_decode_logits_equal_full_forward(lora):
    prompt, follow = PROMPTS[2], [5, 6, 7, 8]
    model = lora.get_base_model()
    cache = LatentCache.for_model(model.config, slots=1, max_len=16, dtype=torch.float32, device="cpu")
    body = prompt[:-1]
    prefill(model, cache, torch.tensor(body), torch.arange(len(body)), torch.zeros(len(body), dtype=torch.long), 1)
    token, pos = torch.tensor([prompt[-1]]), torch.tensor([len(prompt) - 1])
    reference = full_logits(lora, prompt, follow)
    with torch.no_grad():
        for step, nxt in enumerate(follow):
            logits = decode_logits(model, cache, token, pos, attend_len=16)[0]
            assert (logits - reference[step]).abs().max() / reference[step].abs().max() <= 1e-5
            token, pos = torch.tensor([nxt]), pos + 1


def test_adapter_updates_seen_without_rebuilding_engine():
    model = peft_model(seed=6, target_modules=["kv_b_proj", "o_proj"])
    engine = GenerationEngine(model, max_batch=4)
    before = engine.generate(PROMPTS, max_new_tokens=6, temperature=0)
    with torch.no_grad():  # an optimiser step, in place
        for name, param in model.named_parameters():
            if "kv_b_proj.lora_B" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    after = engine.generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert [r[0].token_ids for r in before] != [r[0].token_ids for r in after]
    check_greedy(model, after)


def test_lora_on_stacked_experts_is_called_as_module():
    model = peft_model(seed=8, target_modules=["kv_b_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    check_greedy(model, generate(model, PROMPTS, max_new_tokens=5, temperature=0))


def test_effective_weight_forms():
    plain = nn.Linear(6, 10, bias=False)
    assert effective_weight(plain) is plain.weight
    x = torch.randn(3, 6)
    for config in ({}, {"use_dora": True}):
        holder = nn.Sequential(nn.Linear(6, 10, bias=False))
        wrapped = get_peft_model(holder, LoraConfig(r=2, target_modules=["0"], **config))
        layer = wrapped.base_model.model[0]
        nn.init.normal_(layer.lora_B["default"].weight)
        with torch.no_grad():
            torch.testing.assert_close(x @ effective_weight(layer).T, layer(x))
            with wrapped.disable_adapter():
                torch.testing.assert_close(effective_weight(layer), layer.base_layer.weight)
