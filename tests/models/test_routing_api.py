"""The MoE routing API: scores in every mode, forced expert ids (routing replay), load statistics."""

from __future__ import annotations

import pytest
import torch

from align.models import DeepseekV2ForCausalLM, config_from_dict
from align.models.moe import Routing, RoutingTrace
from tests.models.cases import CASES

MODES = [(True, True), (True, False), (False, True), (False, False)]
MODE_IDS = ["train-grad", "train-no_grad", "eval-grad", "eval-no_grad"]


def case_model(case: str) -> DeepseekV2ForCausalLM:
    family, raw = CASES[case]
    config = config_from_dict({**raw, "model_type": f"deepseek_{family}", "aux_loss_alpha": 0.01})
    model = DeepseekV2ForCausalLM(config)
    model.reset_parameters(seed=0)
    return model


def moe_layers(model: DeepseekV2ForCausalLM) -> list:
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


@pytest.mark.parametrize("training,grad", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", ["v2_lite", "v2_group", "v3_noaux"])
def test_replaying_the_gates_own_ids_reproduces_the_forward(case, training, grad):
    model = case_model(case).train(training)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        trace = RoutingTrace()
        first = model(input_ids=ids, routing=trace)
        replayed = model(input_ids=ids, routing=RoutingTrace(replay=trace.experts()))
    assert sorted(trace.layers) == [mlp.layer_idx for mlp in moe_layers(model)]
    assert torch.equal(first.logits, replayed.logits)
    assert (first.aux_loss is None) == (not training)
    if training:
        assert torch.equal(first.aux_loss, replayed.aux_loss)


@pytest.mark.parametrize("training,grad", MODES, ids=MODE_IDS)
def test_scores_and_load_in_every_mode(training, grad):
    model = case_model("v2_lite").train(training)
    tokens, k = 14, model.config.num_experts_per_tok
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.set_grad_enabled(grad):
        trace = RoutingTrace(with_scores=True)
        model(input_ids=ids, routing=trace)
    n_experts = model.config.n_routed_experts
    for layer, routing in trace.layers.items():
        assert routing.scores is not None and routing.scores.shape == (tokens, n_experts)
        torch.testing.assert_close(routing.scores.sum(-1), torch.ones(tokens))  # softmax scores
        load = routing.load(n_experts)
        assert load.dtype == torch.long and load.shape == (n_experts,) and int(load.sum()) == tokens * k
        assert int(routing.load(n_experts, mask).sum()) == int(mask.sum()) * k
        assert torch.equal(trace.load(n_experts)[layer], load)


def test_forced_ids_are_weighted_from_the_current_scores():
    model = case_model("norm_topk_scaled").eval()
    gate = moe_layers(model)[0].gate
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    forced = torch.tensor([[0, 1, 2], [7, 6, 5], [1, 3, 5], [2, 4, 6], [0, 7, 3]])
    routing = gate(x, experts=forced)
    assert isinstance(routing, Routing) and torch.equal(routing.experts, forced)
    chosen = routing.scores.gather(1, forced)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True) * gate.scale)
    with pytest.raises(ValueError, match=r"expected \(5, 3\)"):
        gate(x, experts=forced[:, :2])


def test_plain_greedy_gate_gives_scores_when_asked():
    model = case_model("v2_lite").eval()
    gate = moe_layers(model)[0].gate
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain, scored = gate(x), gate(x, with_scores=True)
    assert plain.scores is None  # the fast greedy gate skips them unless asked
    assert torch.equal(plain.experts, scored.experts) and torch.equal(plain.weights, scored.weights)
    torch.testing.assert_close(scored.scores, torch.softmax(x @ gate.weight.T, -1))


@pytest.mark.parametrize("case", ["v2_lite", "v2_group", "v3_noaux"])
def test_replay_rows_of_minus_one_choose_by_themselves(case):
    """A recorded replay (int8, -1 where the engine computed no routing) equals the model's own forward
    where the ids are its own, and forces the rest."""
    model = case_model(case).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trace = RoutingTrace()
        first = model(input_ids=ids, routing=trace)
        partial = {layer: e.to(torch.int8).clone() for layer, e in trace.experts().items()}
        for e in partial.values():
            e[::2] = -1
        replayed = model(input_ids=ids, routing=RoutingTrace(replay=partial))
        k, n = model.config.num_experts_per_tok, model.config.n_routed_experts
        other = {layer: (e.long() + k) % n for layer, e in trace.experts().items()}  # never the own choice
        for e in other.values():
            e[::2] = -1
        forced = RoutingTrace(replay=other)
        model(input_ids=ids, routing=forced)
    torch.testing.assert_close(replayed.logits, first.logits, rtol=1e-6, atol=1e-6)
    for layer, routing in forced.layers.items():
        assert torch.equal(routing.experts[::2], trace.layers[layer].experts[::2])
        assert torch.equal(routing.experts[1::2], other[layer][1::2])
