"""ESFT in one process: the sliced experts compute what the stacked ones do, the scores follow the
published formulas, only the chosen slices train, the final checkpoint equals the base outside them
bit for bit, resume is exact and reuses esft_experts.json, recipe errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.models import DeepseekV2ForCausalLM
from align.models.expert_slices import SlicedExperts
from align.models.moe import Experts
from align.recipe import RecipeError, SFTRecipe, load_recipe
from align.train.esft import EXPERTS_FILE, choose, read_choice, sample_weights, top_p_experts
from align.train.metrics import read_metrics
from align.train.run import load_tokenizer_for, make_accelerator
from align.train.setup import load_base_model
from align.train.sft import prepare_data, run_sft

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=3", "data.synthetic.train=96", "data.synthetic.test=16",
    "data.max_length=32", "data.packing=false", "train.steps=4", "train.micro_batch_size=8", "train.bf16=false",
    "optim.lr=1e-2", "output.progress=false", "eval.batch_size=16", "train.deterministic=true",
    "esft.top_p=0.3", "esft.sample_tokens=600",
]


def recipe(run_dir: Path, *overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, [*BASE, f"output.run_dir={run_dir}", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def experts(n: int = 6, hidden: int = 8, inter: int = 4) -> Experts:
    config = type("C", (), {"n_routed_experts": n, "hidden_size": hidden, "moe_intermediate_size": inter})
    module = Experts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.3)
        module.down_proj.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("tuned", [[4, 1], [0], [5, 2, 3]])
def test_sliced_experts_match_the_stacked_ones(tuned):
    """Same output as Experts; the tuned slices get the gradient the stacked tensor's slices would."""
    torch.manual_seed(0)
    plain = experts()
    x = torch.randn(10, 8, requires_grad=True)
    ids = torch.randint(0, 6, (10, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 6
    weights = torch.rand(10, 2)
    ref = plain(x, weights, ids)
    ref.square().sum().backward()
    sliced = SlicedExperts(experts_copy(plain), tuned)
    x2 = x.detach().clone().requires_grad_(True)
    out = sliced(x2, weights, ids)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sliced.tuned_gate_up_proj.grad, plain.gate_up_proj.grad[tuned], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sliced.tuned_down_proj.grad, plain.down_proj.grad[tuned], rtol=1e-5, atol=1e-6)
    assert sliced.gate_up_proj.grad is None and not sliced.gate_up_proj.requires_grad
    with torch.no_grad():  # the fast path: the stacked tensors
        torch.testing.assert_close(sliced(x, weights, ids), ref.detach(), rtol=1e-5, atol=1e-6)


def experts_copy(module: Experts) -> Experts:
    copy = experts()
    copy.load_state_dict(module.state_dict())
    return copy


def test_sliced_experts_without_a_routed_row_keep_their_gradient():
    sliced = SlicedExperts(experts(), [5])
    ids = torch.tensor([[0, 1], [2, 3]])
    sliced(torch.randn(2, 8), torch.rand(2, 2), ids).sum().backward()
    assert sliced.tuned_gate_up_proj.grad is not None and not sliced.tuned_gate_up_proj.grad.any()


def test_sync_writes_the_slices_back_only():
    module = experts()
    before = module.gate_up_proj.detach().clone()
    sliced = SlicedExperts(module, [2])
    with torch.no_grad():
        sliced.tuned_gate_up_proj.add_(1.0)
    sliced.sync_()
    changed = (sliced.gate_up_proj != before).flatten(1).any(1)
    assert changed.tolist() == [False, False, True, False, False, False]


def test_bad_expert_ids_are_refused():
    with pytest.raises(ValueError, match=r"distinct ids in \[0, 6\)"):
        SlicedExperts(experts(), [6])


def test_sample_weights_split_packed_documents():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]),
             "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])}
    inverse, samples = sample_weights(batch)
    assert samples == 3
    expected = [1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 0, 1 / 2, 1 / 2, 0, 0, 0, 0]
    assert inverse.tolist() == pytest.approx(expected)


def test_top_p_takes_the_shortest_prefix_reaching_p():
    assert top_p_experts([0.1, 0.5, 0.25, 0.15], 0.5) == [1]
    assert top_p_experts([0.1, 0.5, 0.25, 0.15], 0.51) == [1, 2]
    assert top_p_experts([0.25, 0.25, 0.25, 0.25], 0.3) == [0, 1]  # ties: lower id first
    assert top_p_experts([0.1, 0.5, 0.25, 0.15], 1.0) == [0, 1, 2, 3]


def test_choose_uses_shares_of_each_layer():
    sums = torch.tensor([[[1.0, 3.0, 0.0, 0.0], [0.2, 0.1, 0.3, 0.0]]], dtype=torch.float64)  # [1 layer, 2, 4]
    token = choose(sums, [1], "token", 0.5, samples=2, tokens=10)
    gate = choose(sums, [1], "gate", 0.5, samples=2, tokens=10)
    assert token.layers == {1: [1]} and gate.layers == {1: [0, 2]}
    assert sum(token.scores["gate"][1]) == pytest.approx(1.0)


def test_scores_follow_the_formulas(tmp_path):
    """esft_experts.json's shares, recomputed here from one RoutingTrace per training row."""
    from align.models.moe import RoutingTrace
    from align.train.esft import sample_rows

    r = recipe(tmp_path / "run", "train.steps=1", "output.merge=false", "eval.exact_match=false")
    run_sft(r)
    choice = read_choice(tmp_path / "run" / EXPERTS_FILE)
    data = prepare_data(r, load_tokenizer_for(r), make_accelerator(r), lambda _: None)
    model = load_base_model(r, torch.device("cpu")).eval()
    rows = sample_rows(data.tokens, r.esft.sample_tokens, r.train.seed)
    token, gate = torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64)
    for i in rows:
        trace = RoutingTrace()
        with torch.no_grad():
            model(input_ids=torch.tensor([data.train[i]["input_ids"]]), routing=trace)
        for layer, routing in trace.layers.items():
            length = routing.experts.shape[0]
            for t in range(length):
                for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist(), strict=True):
                    token[layer, e] += 1 / (2 * length)
                    gate[layer, e] += w / length
    assert choice.samples == len(rows) and choice.tokens == sum(data.tokens[i] for i in rows)
    for layer in (1, 2):
        assert choice.scores["token"][layer] == pytest.approx((token[layer] / token[layer].sum()).tolist(), abs=1e-6)
        assert choice.scores["gate"][layer] == pytest.approx((gate[layer] / gate[layer].sum()).tolist(), abs=1e-6)


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return DeepseekV2ForCausalLM.from_pretrained(path, dtype="float32").state_dict()


def test_only_the_chosen_experts_change(tmp_path):
    """final/ is the full hub layout; outside the chosen slices every tensor equals the base bit for bit."""
    r = recipe(tmp_path / "run", "esft.score=gate")
    run_sft(r)
    choice = read_choice(tmp_path / "run" / EXPERTS_FILE)
    assert choice.score == "gate" and set(choice.layers) == {1, 2}
    base = load_base_model(r, torch.device("cpu")).state_dict()
    final = state_of(tmp_path / "run" / "final")
    assert set(final) == set(base)
    for key, tensor in base.items():
        if ".mlp.experts." not in key:
            assert torch.equal(final[key], tensor), key
            continue
        layer = int(key.split(".")[2])
        chosen = torch.zeros(tensor.shape[0], dtype=torch.bool)
        chosen[choice.layers[layer]] = True
        same = (final[key] == tensor).flatten(1).all(1)
        assert same[~chosen].all(), key
        assert not same[chosen].any(), key  # every chosen expert trained


def test_resume_is_exact_and_reuses_the_choice(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(recipe(a, "train.steps=6", "train.save_every=3", "output.merge=false"))
    step3 = a / "checkpoints" / "step-000003"
    assert (step3 / "esft" / EXPERTS_FILE).is_file()
    planted = json.loads((step3 / "esft" / EXPERTS_FILE).read_text())
    planted["samples"] = 123456  # a rescoring would write its own count
    (step3 / "esft" / EXPERTS_FILE).write_text(json.dumps(planted))
    run_sft(recipe(b, "train.steps=6", "output.merge=false", f"resume_from={step3}"))
    assert read_choice(b / EXPERTS_FILE).samples == 123456
    first, second = losses(a), losses(b)
    assert sorted(second) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), step


def test_trainable_parameters_are_the_slices(tmp_path):
    from align.train.setup import ESFTSetup

    r = recipe(tmp_path / "run", "esft.train_shared_experts=true")
    accelerator = make_accelerator(r)
    task = prepare_data(r, load_tokenizer_for(r), accelerator, lambda _: None)
    model, extra = ESFTSetup.load(r, None, accelerator, None, task=task)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.{i}.mlp.{part}" for i in (1, 2) for part in (
        "experts.tuned_gate_up_proj", "experts.tuned_down_proj", "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight", "shared_experts.down_proj.weight")}
    assert all(isinstance(m, SlicedExperts) for m in extra["sliced"])


@pytest.mark.parametrize("override, message", [
    ("lora.r=4", "'esft' and 'lora' are exclusive"),
    ("esft.top_p=0", "'esft.top_p' must be in (0, 1]"),
    ("esft.score=expert", "esft.score"),
    ("esft.sample_tokens=0", "'esft.sample_tokens' must be >= 1"),
])
def test_recipe_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        recipe(tmp_path, override)
