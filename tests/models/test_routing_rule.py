"""Routing weights per family, against a float64 reference written from DeepSeek's formulas.

DeepSeek-V2 (its own modeling code): normalise the top-k scores when norm_topk_prob (and k > 1),
otherwise multiply them by routed_scaling_factor. DeepSeek-V3: normalise (same condition), then scale.
"""

from __future__ import annotations

import pytest
import torch

from align.kernels.moe_route import greedy_gate_reference
from align.models.config import config_from_dict, routing_weight_rule
from align.models.moe import Gate
from tests.models.cases import BASE

SCALE = 2.5


def formula_weights(x, weight, family, k, norm_topk_prob, bias=None):
    """float64: scores, greedy (or biased) top-k, then the family's weight rule."""
    logits = x.double() @ weight.double().T  # [T, E]
    scores = logits.softmax(-1) if family == "deepseek_v2" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.double()
    experts = choice.topk(k, dim=-1).indices  # [T, k]
    chosen = scores.gather(1, experts)
    normed = chosen / chosen.sum(-1, keepdim=True)
    if family == "deepseek_v2":
        weights = normed if (norm_topk_prob and k > 1) else chosen * SCALE
    else:
        weights = (normed if (norm_topk_prob and k > 1) else chosen) * SCALE
    return weights, experts


def gate_for(family, k, norm_topk_prob):
    raw = {**BASE, "model_type": family, "num_experts_per_tok": k, "norm_topk_prob": norm_topk_prob,
           "routed_scaling_factor": SCALE, "q_lora_rank": None}
    if family == "deepseek_v3":
        raw.update(n_group=1, topk_group=1, topk_method="noaux_tc", num_nextn_predict_layers=0)
    else:
        raw.update(topk_method="greedy")
    config = config_from_dict(raw)
    gate = Gate(config)
    torch.manual_seed(0)
    gate.weight.data.normal_(0, 0.3)
    if family == "deepseek_v3":
        gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return config, gate


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_gate_weights_follow_the_family_rule(family, norm_topk_prob, k):
    config, gate = gate_for(family, k, norm_topk_prob)
    x = torch.randn(40, config.hidden_size, generator=torch.Generator().manual_seed(1))
    bias = gate.e_score_correction_bias if family == "deepseek_v3" else None
    ref_weights, ref_experts = formula_weights(x, gate.weight, family, k, norm_topk_prob, bias)
    weights, experts, _ = gate(x)
    order, ref_order = experts.sort(-1), ref_experts.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    got = weights.gather(1, order.indices).double()
    want = ref_weights.gather(1, ref_order.indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_v2_normalised_weights_are_not_scaled():
    """The case the old rule got wrong: V2 + norm_topk_prob sums to 1, not to routed_scaling_factor."""
    config, gate = gate_for("deepseek_v2", 3, True)
    assert routing_weight_rule(config) == (True, 1.0)
    weights, _, _ = gate(torch.randn(8, config.hidden_size))
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))
    v3, _ = gate_for("deepseek_v3", 3, True)
    assert routing_weight_rule(v3) == (True, SCALE)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_greedy_gate_reference_with_the_v2_rule(norm_topk_prob):
    config, gate = gate_for("deepseek_v2", 3, norm_topk_prob)
    x = torch.randn(16, config.hidden_size)
    weights, experts = greedy_gate_reference(x, gate.weight, 3, *routing_weight_rule(config))
    ref_weights, ref_experts = formula_weights(x, gate.weight, "deepseek_v2", 3, norm_topk_prob)
    order, ref_order = experts.sort(-1), ref_experts.sort(-1)  # the order of the k choices is unspecified
    assert torch.equal(order.values, ref_order.values)
    got, want = weights.gather(1, order.indices).double(), ref_weights.gather(1, ref_order.indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
