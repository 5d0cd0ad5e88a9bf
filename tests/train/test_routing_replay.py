"""Routing replay (grpo.routing_replay) and the routing metrics (align.train.moe_metrics).

The model: the tiny preset in bf16 with its routed experts amplified (x4 on both stacked weights), so
an expert chosen differently changes the output visibly. bf16 rounding differs between the engine's
decode step (absorbed attention, one token at a time) and the training forward (full sequences), so a
few token-layer choices flip between them; the engine's sampled log-probs and the training ones then
differ by up to ~0.1-0.3 on those tokens. With replay the training forward routes every token as the
engine did and the rest is bf16 noise: measured max |diff| 0.009-0.013 on the models of the probe.
"""

from __future__ import annotations

import pytest
import torch

from align.generation import GenerationEngine
from align.models import build_model
from align.recipe import GRPOSection
from align.train.grpo import update
from align.train.moe_metrics import MoEMetrics, load_metrics
from align.train.optim import build_optimizer, build_scheduler
from align.train.rollout_batch import completion_logprobs_entropy, make_batch, policy_pass
from align.train.setup import FullSetup

REPLAY_TOL = 0.02  # max |engine − training| log-prob per token with replay (bf16 noise)
FLIP_MIN = 0.1  # without replay, the worst token is at least this far off (a flipped expert)


def amplified(dtype=torch.bfloat16, seed: int = 11):
    model = build_model("tiny", seed=seed, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.experts.gate_up_proj.mul_(4.0)
                layer.mlp.experts.down_proj.mul_(4.0)
    return model


def rollout_batch(model, prompts=4, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = [[0, *torch.randint(2, 1000, (length,), generator=gen).tolist()] for _ in range(prompts)]
    out = GenerationEngine(model).generate(ids, max_new_tokens=12, temperature=1.0, n=4, seed=seed,
                                           eos_token_id=None, record_routing=True)
    flat = [(p, c) for p, cs in zip(ids, out, strict=True) for c in cs]
    advantages = torch.randn(len(flat), generator=gen)
    return make_batch([p for p, _ in flat], [c.token_ids for _, c in flat], advantages, 2, None, "cpu",
                      [c.logprobs for _, c in flat], [c.routing for _, c in flat])


@pytest.fixture(scope="module")
def bf16_case():
    torch.manual_seed(0)
    model = amplified()
    return model, rollout_batch(model, seed=2)  # a rollout in which bf16 flips an expert that matters


def mismatch(model, batch, replay: bool) -> tuple[torch.Tensor, dict]:
    metrics = MoEMetrics(model.config)
    with torch.no_grad():
        out = policy_pass(model.eval(), model.get_output_embeddings(), batch, 1.0, replay=replay, observe=True)
    metrics.add(out, batch)
    return (out.logps - batch.sample_logps).abs() * batch.token_mask, metrics.summary()


def test_replay_matches_the_engines_logprobs_far_more_tightly(bf16_case):
    model, batch = bf16_case
    off, off_metrics = mismatch(model, batch, replay=False)
    on, on_metrics = mismatch(model, batch, replay=True)
    assert off_metrics["moe/routing_agreement"] < 1.0  # bf16 flipped some choices
    assert off.max() > FLIP_MIN
    assert on.max() < REPLAY_TOL
    assert on_metrics["policy/logprob_mismatch"] < off_metrics["policy/logprob_mismatch"]
    assert off_metrics["policy/logprob_mismatch"] == pytest.approx((off.sum() / batch.token_mask.sum()).item())


def test_replay_off_is_todays_forward_exactly(bf16_case):
    model, batch = bf16_case
    with torch.no_grad():
        plain = completion_logprobs_entropy(model.eval(), model.get_output_embeddings(), batch, 1.0)[0]
        observed = policy_pass(model, model.get_output_embeddings(), batch, 1.0, observe=True).logps
    assert torch.equal(plain, observed)


def full_setup(model) -> FullSetup:
    from accelerate import Accelerator

    optimizer = build_optimizer(model, lr=1e-3)
    return FullSetup(model.train(), optimizer, build_scheduler(optimizer, "constant", 4), "single",
                     Accelerator(cpu=True), None)


def run_update(batch, replay: str, routing: bool, seed: int = 3):
    model = amplified(torch.float32, seed=seed)
    if not routing:
        batch.routing = None
    metrics, skipped = update(full_setup(model), batch, GRPOSection(routing_replay=replay, micro_batch_size=6,
                                                                    num_iterations=2), max_grad_norm=1.0)
    return model, metrics


def test_update_with_replay_off_is_unchanged_by_recording():
    source = amplified(torch.float32, seed=3)
    batches = [rollout_batch(source, prompts=2, seed=5) for _ in range(2)]
    plain, plain_metrics = run_update(batches[0], "none", routing=False)
    recorded, metrics = run_update(batches[1], "none", routing=True)
    for a, b in zip(plain.parameters(), recorded.parameters(), strict=True):
        assert torch.equal(a, b)
    assert batches[1].routing is None  # freed after the update
    assert metrics["moe/routing_agreement"] > 0.99  # float32: the engine and training agree
    assert metrics["policy/logprob_mismatch"] < 1e-4
    assert metrics["aux_loss"] > 0 and "moe/routing_agreement" not in plain_metrics


def test_replay_recomputes_the_gate_weights_so_the_router_gets_gradients(bf16_case):
    model = amplified(torch.float32)
    batch = rollout_batch(model, prompts=2, seed=6)
    out = policy_pass(model.train(), model.get_output_embeddings(), batch, 1.0, replay=True)
    (out.logps * batch.advantages[:, None]).sum().backward()
    gates = [layer.mlp.gate.weight.grad for layer in model.model.layers if layer.is_moe]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)
    metrics, _ = update(full_setup(amplified(torch.float32)), batch, GRPOSection(routing_replay="rollout"), 1.0)
    assert metrics["policy/logprob_mismatch"] < 1e-4 and metrics["moe/routing_agreement"] > 0.99


def test_replay_without_recorded_routing_is_an_error(bf16_case):
    model, batch = bf16_case
    bare = batch.rows(0, 2)
    bare.routing = None
    with pytest.raises(ValueError, match="record_routing"):
        policy_pass(model, model.get_output_embeddings(), bare, 1.0, replay=True)


def test_load_metrics_by_hand():
    out = load_metrics({1: [4, 0, 0, 0], 2: [1, 1, 1, 1]})
    assert out["moe/load_max_over_mean/layer_1"] == 4.0 and out["moe/load_entropy/layer_1"] == 0.0
    assert out["moe/load_max_over_mean/layer_2"] == 1.0 and out["moe/load_entropy/layer_2"] == pytest.approx(1.0)
    assert out["moe/load_max_over_mean"] == 4.0 and out["moe/load_entropy"] == 0.0


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_balance_loss_is_in_the_rl_loss_and_logged_apart(alpha):
    """train.aux_loss_alpha (TRL's router_aux_loss_coef): with zero advantages the policy term is 0, so the
    step's loss is the balance loss alone, over the real (unpadded) tokens."""
    from align.train.setup import set_aux_loss_alpha

    model = amplified(torch.float32, seed=4)
    set_aux_loss_alpha(model, alpha)
    batch = rollout_batch(model, prompts=2, seed=7)
    batch.advantages.zero_()
    metrics, _ = update(full_setup(model), batch, GRPOSection(micro_batch_size=8), max_grad_norm=1.0)
    if alpha:
        assert metrics["aux_loss"] > 0 and metrics["loss"] == pytest.approx(metrics["aux_loss"], rel=1e-5)
    else:
        assert "aux_loss" not in metrics and metrics["loss"] == 0.0
