"""PEFT adapters are live in generation: decode equals the full forward of the PEFT model."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def seeded(seed: int):
    """peft draws lora_A from the global RNG: seed it for the block (and put it back), so the adapters a
    test checks do not depend on which tests ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def peft_model(seed: int = 5, **config):
    model = build_model("tiny", seed=seed).eval()
    with seeded(seed):
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


# ----------------------------------------------------------------------------- folded adapters
def product_lora(seed: int, routed_experts: bool = False):
    """The product's adapters (align.train.lora: attention, dense MLP, shared and optionally routed
    experts) on the tiny model, with nonzero B so they matter."""
    from align.train.lora import apply_lora, lora_config

    model = build_model("tiny", seed=seed).eval()
    with seeded(seed):
        wrapped = apply_lora(model, lora_config(model, r=4, alpha=8, routed_experts=routed_experts))  # split LoRA
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return wrapped.eval()


@pytest.mark.parametrize("routed_experts", [False, True])
def test_folded_weights_equal_peft_delta(routed_experts):
    from peft.tuners.lora.layer import Linear, ParamWrapper

    from align.generation.fold import DecodeWeights

    model = product_lora(9, routed_experts)
    layers = [m for m in model.modules() if isinstance(m, Linear | ParamWrapper)]
    kinds = {("ParamWrapper" if isinstance(m, ParamWrapper) else "Linear",
              m.get_base_layer()._parameters[getattr(m, "parameter_name", "weight")].dim()) for m in layers}
    assert ("ParamWrapper", 3) in kinds if routed_experts else kinds == {("Linear", 2), ("ParamWrapper", 2)}
    params = {id(p) for p in model.parameters()}
    names = [getattr(m, "parameter_name", "weight") for m in layers]
    originals = [m.get_base_layer()._parameters[n] for m, n in zip(layers, names, strict=True)]
    folds = DecodeWeights()
    with folds.applied(model) as count:
        assert count == len(layers)
        assert all(m.disable_adapters for m in layers)
        for m, name, original in zip(layers, names, originals, strict=True):
            folded = m.get_base_layer()._parameters[name]
            assert folded is not original
            torch.testing.assert_close(folded, original + m.get_delta_weight("default"), rtol=1e-6, atol=1e-6)
    assert {id(p) for p in model.parameters()} == params  # everything restored
    assert not any(m.disable_adapters for m in layers)


@pytest.mark.parametrize("routed_experts", [False, True])
def test_folded_engine_equals_training_forward(routed_experts):
    model = product_lora(10, routed_experts)
    engine = GenerationEngine(model, max_batch=2, fold=True)
    results = engine.generate(PROMPTS, max_new_tokens=8, temperature=0)
    assert engine.folded.nbytes() > 0
    assert any(b.dim() == 3 for b in engine.folded.buffers.values()) == routed_experts
    check_greedy(model, results)  # the training path (peft's forward with live adapters) agrees
    live = GenerationEngine(model, max_batch=2, fold=False).generate(PROMPTS, max_new_tokens=8, temperature=0)
    assert [r[0].token_ids for r in results] == [r[0].token_ids for r in live]


def test_fold_refreshes_after_optimizer_step_and_frees_when_disabled():
    model = product_lora(11, routed_experts=True)
    engine = GenerationEngine(model, max_batch=4, fold=True)
    before = engine.generate(PROMPTS, max_new_tokens=6, temperature=0)
    buffers = {k: v.data_ptr() for k, v in engine.folded.buffers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    loss = model(torch.tensor([PROMPTS[2]])).logits.sum()
    loss.backward()
    optimizer.step()  # adapters change in place, as between two GRPO rounds
    after = engine.generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert {k: v.data_ptr() for k, v in engine.folded.buffers.items()} == buffers  # rewritten in place
    assert [r[0].token_ids for r in before] != [r[0].token_ids for r in after]
    check_greedy(model, after)
    with model.disable_adapter():  # the reference policy: base weights, no fold held
        base = engine.generate(PROMPTS, max_new_tokens=6, temperature=0)
        assert engine.folded.nbytes() == 0
        check_greedy(model, base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("routed_experts", [False, True])
def test_folded_graphs_survive_optimizer_step(routed_experts):
    """On CUDA folding is the default; graphs captured over the folded buffers are replayed after an
    optimizer step (buffers rewritten in place) and the log-probs still agree with the training forward
    as closely as the unfolded engine's do (bf16)."""
    model = product_lora(12, routed_experts).to("cuda", torch.bfloat16)
    engine = GenerationEngine(model, max_batch=4, attend_bucket=16)
    assert engine.fold
    engine.generate(PROMPTS, max_new_tokens=12, temperature=0)
    graphs = engine.graphs
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1.0)
    after = engine.generate(PROMPTS, max_new_tokens=12, temperature=0)
    if engine.use_graphs:
        assert engine.graphs is graphs and graphs.graphs  # same signature: replayed, not recaptured
    assert any(b.dim() == 3 for b in engine.folded.buffers.values()) == routed_experts
    live = GenerationEngine(model, max_batch=4, attend_bucket=16, fold=False).generate(
        PROMPTS, max_new_tokens=12, temperature=0)
    assert training_path_error(model, after) <= max(0.05, 2 * training_path_error(model, live))


def training_path_error(model, results) -> float:
    """Largest |engine log-prob - training forward's| over the completions (CUDA)."""
    worst = 0.0
    for prompt, [completion] in zip(PROMPTS, results, strict=True):
        ids = torch.tensor([prompt + completion.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float().cpu()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    return worst


def test_lora_variants_stay_live_under_fold():
    model = peft_model(seed=13, target_modules=["kv_b_proj", "o_proj"], use_dora=True)
    engine = GenerationEngine(model, max_batch=4, fold=True)
    check_greedy(model, engine.generate(PROMPTS, max_new_tokens=5, temperature=0))
    assert engine.folded.nbytes() == 0  # DoRA: nothing folded, the layers ran as themselves


def test_fold_defaults_and_expert_copy_declined_without_room(monkeypatch):
    import align.generation.fold as fold

    model = product_lora(14, routed_experts=True)
    engine = GenerationEngine(model, max_batch=4)
    assert not engine.fold and not engine.compact  # CPU defaults: the unfolded numerics
    engine.generate(PROMPTS, max_new_tokens=3, temperature=0)
    assert engine.folded.nbytes() == 0
    monkeypatch.setattr(fold, "_room_for", lambda nbytes, device: False)
    engine = GenerationEngine(model, max_batch=4, fold=True)
    with pytest.warns(UserWarning, match="routed-expert LoRA"):
        results = engine.generate(PROMPTS, max_new_tokens=5, temperature=0)
    assert engine.folded.nbytes() > 0 and all(b.dim() == 2 for b in engine.folded.buffers.values())
    check_greedy(model, results)  # the experts' adapters ran live
