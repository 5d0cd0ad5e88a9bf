"""GRPO loss and advantages: hand-computed cases, then equality with TRL 1.16's GRPOTrainer.

The TRL half builds a real ``trl.GRPOTrainer`` once per module around a tiny random Llama and a
WordLevel tokenizer made here, so nothing is fetched from a hub: the model and tokenizer objects
are passed in directly, and ``beta=0`` at construction keeps TRL from loading a reference model
by name. Each case then sets the loss options as trainer attributes (read by ``_compute_loss`` on
every call) and hands TRL the reference log-probs in ``inputs``, as its generation step would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from align.train.advantages import ADVANTAGE_EPS, group_advantages, nanstd, reward_std
from align.train.grpo_loss import GRPOLossConfig, grpo_loss, k3_kl, mask_truncated_completions
from rewards import WeightedReward, combine_scores, score

# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 10.0])  # two groups of G = 3


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # group 1: mean 2, unbiased std 1; group 2: mean 6, std sqrt((4 + 4 + 16) / 2) = sqrt(12)
        ("group", [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)] + [v / (math.sqrt(12) + 1e-4) for v in (-2, -2, 4)]),
        # baseline stays the group mean; std over all six: mean 4, SS 50, var 50 / 5 = 10
        ("batch", [v / (math.sqrt(10) + 1e-4) for v in (-1, 0, 1, -2, -2, 4)]),
        ("none", [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]),
    ],
)
def test_group_advantages_by_hand(mode: str, expected: list[float]) -> None:
    adv = group_advantages(REWARDS, group_size=3, scale_rewards=mode)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_group_advantages_nan_and_zero_std() -> None:
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=3)
    s = math.sqrt(2) + ADVANTAGE_EPS  # std of {1, 3}, the NaN left out
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))
    assert reward_std(rewards, 3)[3:].eq(0).all()
    assert torch.isnan(nanstd(torch.tensor([2.0, float("nan")])))


def test_combine_scores_weights_and_unscorable() -> None:
    per_func = [[1.0, None, 2.0], [float("nan"), None, 3.0]]  # two functions, three rows
    combined = combine_scores(per_func, [1.0, 0.5])
    assert combined[0] == 1.0 and math.isnan(combined[1]) and combined[2] == 3.5
    with pytest.raises(ValueError, match="reward weights"):
        combine_scores(per_func, [1.0])


def test_all_none_row_gets_advantage_zero_and_leaves_its_group_alone() -> None:
    """The RL loop's path (rewards.score -> float32 tensor -> group_advantages): a completion no reward
    scored has advantage 0, and its siblings' advantages are those of the group without it."""
    values = [1.0, None, 3.0, 5.0, 2.0, 2.0, 2.0, 4.0]  # two groups of G = 4; row 1 unscorable

    def reward(prompts, completions, **_):
        return [values[int(c)] for c in completions]

    totals, _, _ = score([WeightedReward("r", reward, weight=2.0)], ["p"] * 8, [str(i) for i in range(8)])
    adv = group_advantages(torch.tensor(totals, dtype=torch.float32), group_size=4)
    s = 4.0 + ADVANTAGE_EPS  # group 1 without row 1: weighted {2, 6, 10}, mean 6, unbiased std 4
    expected = [-4 / s, 0.0, 0.0, 4 / s, *group_advantages(torch.tensor([4.0, 4.0, 4.0, 8.0]), 4).tolist()]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_k3_kl_values() -> None:
    logp = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.5]))
    # exp(d) - d - 1 with d = ref - logp: d = -ln 2 -> ln 2 - 1/2; d = 0 -> 0; d = ln 2 -> 1 - ln 2
    expected = torch.tensor([math.log(2) - 0.5, 0.0, 1 - math.log(2)])
    torch.testing.assert_close(k3_kl(logp, ref), expected)


RATIOS = [0.5, 1.0, 1.5, 1.1]  # ε_low = 0.2, ε_high = 0.28 -> clip range [0.8, 1.28]


def _one_sequence_loss(advantage: float, delta: float | None = None) -> tuple[Tensor, Tensor, dict]:
    logps = torch.log(torch.tensor([RATIOS])).requires_grad_()
    cfg = GRPOLossConfig(epsilon=0.2, epsilon_high=0.28, delta=delta, loss_type="bnpo")
    loss, metrics = grpo_loss(
        logps, torch.zeros(1, 4), None, torch.tensor([advantage]), torch.ones(1, 4), cfg
    )
    loss.backward()
    return loss, logps.grad, metrics


def test_clipping_positive_advantage() -> None:
    # -min(ρ, clip(ρ)): 0.5 stays (low side never clips a positive advantage), 1.5 -> 1.28
    loss, grad, metrics = _one_sequence_loss(+1.0)
    assert loss.item() == pytest.approx(-(0.5 + 1.0 + 1.28 + 1.1) / 4)
    torch.testing.assert_close(grad, -torch.tensor([[0.5, 1.0, 0.0, 1.1]]) / 4)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.25)


def test_clipping_negative_advantage() -> None:
    # -min(-ρ, -clip(ρ)) = max(ρ, clip(ρ)): 0.5 -> 0.8 (clipped), 1.5 stays (unbounded above)
    loss, grad, metrics = _one_sequence_loss(-1.0)
    assert loss.item() == pytest.approx((0.8 + 1.0 + 1.5 + 1.1) / 4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 1.5, 1.1]]) / 4)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_two_sided_clipping_delta() -> None:
    # δ = 1.4 caps the unclipped ratio: max(min(1.5, 1.4), clip(1.5)) = 1.4, without gradient
    loss, grad, _ = _one_sequence_loss(-1.0, delta=1.4)
    assert loss.item() == pytest.approx((0.8 + 1.0 + 1.4 + 1.1) / 4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 0.0, 1.1]]) / 4)


def test_off_policy_uses_old_logps() -> None:
    gen = torch.Generator().manual_seed(0)
    logps = (-torch.rand(3, 5, generator=gen) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(3, 5, generator=gen)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    cfg = GRPOLossConfig(loss_type="grpo", epsilon=0.2)
    off, _ = grpo_loss(logps, old, None, adv, mask, cfg)
    on, _ = grpo_loss(logps, None, None, adv, mask, cfg)
    ratio = torch.exp(logps - old)
    a = adv.unsqueeze(1)
    per_token = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
    expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(off, expected)
    torch.testing.assert_close(on, -adv.mean())  # ρ = 1 on-policy: the loss is −mean(Â)
    assert not torch.isclose(off, on)


def test_sequence_level_ratio() -> None:
    logps = torch.tensor([[-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.5, -1.5, 0.0]])
    cfg = GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon=10.0)
    loss, _ = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), cfg)
    # ρ = exp(mean over the 2 unmasked tokens of (0.5, -0.5)) = 1; the masked token is ignored
    assert loss.item() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("grpo", {}, -(1 + 2) / 2),
        ("bnpo", {}, -(1 * 2 + 2 * 4) / 6),
        ("dr_grpo", {}, -10 / (2 * 8)),
        ("dapo", {}, -10 / 20),
        ("grpo", {"grad_accum_steps": 2}, -(1 + 2) / 2 / 2),
        # normaliser N / P · GA / SPG = 20 / 2 · 2 / 4 = 5
        ("dapo", {"grad_accum_steps": 2, "steps_per_generation": 4, "num_processes": 2}, -10 / 5),
    ],
)
def test_aggregations(loss_type: str, kwargs: dict, expected: float) -> None:
    logps = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    cfg = GRPOLossConfig(loss_type=loss_type, max_completion_length=8)
    loss, _ = grpo_loss(logps, None, None, torch.tensor([1.0, 2.0]), mask, cfg, 20, **kwargs)
    assert loss.item() == pytest.approx(expected)


def test_beta_zero_needs_no_reference_and_beta_positive_does() -> None:
    logps, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2)
    _, metrics = grpo_loss(logps, None, None, adv, mask, GRPOLossConfig(beta=0.0, loss_type="bnpo"))
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, GRPOLossConfig(beta=0.04, loss_type="bnpo"))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, None, None, adv, mask, GRPOLossConfig(loss_type="dapo"))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="importance_sampling_level"):
        GRPOLossConfig(importance_sampling_level="batch")  # type: ignore[arg-type]
    assert GRPOLossConfig(epsilon=0.1).eps_high == 0.1


def test_mask_truncated_completions_by_hand() -> None:
    ids = torch.tensor([[5, 1, 0], [5, 6, 7], [5, 0, 0], [0, 0, 0], [5, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert torch.equal(mask_truncated_completions(ids, mask, [1]), expected)
    expected[4] = torch.tensor([1, 1, 0])  # ends in the pad id, which TRL also counts as a stop
    assert torch.equal(mask_truncated_completions(ids, mask, [1], pad_token_id=0), expected)


# ---------------------------------------------------------------------------------------------
# Equality with TRL's GRPOTrainer
# ---------------------------------------------------------------------------------------------

NUM_GENERATIONS = 4
BATCH = 8  # two prompts × G
MAX_COMPLETION = 6
TEMPERATURE = 0.7
REWARD_WEIGHTS = [1.0, 0.5]
WORDS = ["<pad>", "<eos>", "<unk>", *"abcdefghij"]


def reward_len(completion_ids: list[list[int]], **_: object) -> list[float | None]:
    return [None if ids[-1] % 4 == 0 else float(len(ids)) for ids in completion_ids]


def reward_first(completion_ids: list[list[int]], **_: object) -> list[float | None]:
    return [None if ids[0] % 2 == 0 else float(ids[0] % 5) for ids in completion_ids]


@dataclass
class TRLSetup:
    trainer: object
    batch: list[dict[str, str]]
    inputs: dict[str, Tensor]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory: pytest.TempPathFactory) -> TRLSetup:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    prompts = ["a b", "c d e"]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=BATCH, num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, beta=0.0,
        reward_weights=REWARD_WEIGHTS, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=_tiny_model(),
        reward_funcs=[reward_len, reward_first],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=_tiny_tokenizer(),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    batch = [{"prompt": p} for p in prompts for _ in range(NUM_GENERATIONS)]
    out = trainer._generate_and_score_completions(batch)
    return TRLSetup(trainer, batch, _loss_inputs(trainer.model, out))


def _per_token_logps(model, inputs: dict[str, Tensor]) -> Tensor:
    """Plain forward + log-softmax of temperature-scaled logits, gathered at the completion tokens."""
    return _logps_entropies(model, inputs)[0]


def _logps_entropies(model, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(_per_token_logps, the entropy of each completion position's distribution, without gradient)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].size(1)
    logp = (model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1] / TEMPERATURE).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1).detach()
    return logp.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1), entropy


def _loss_inputs(model, out: dict[str, Tensor]) -> dict[str, Tensor]:
    """The generated batch, one row's mask zeroed (as truncation masking does), random advantages,
    and old/reference log-probs perturbed from the current policy so ratios leave the clip range."""
    gen = torch.Generator().manual_seed(1)
    inputs = {k: out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids")}
    inputs["completion_mask"] = out["completion_mask"].clone()
    inputs["completion_mask"][2] = 0
    with torch.no_grad():
        base = _per_token_logps(model, inputs)
    inputs["advantages"] = torch.randn(BATCH, generator=gen)
    inputs["old_per_token_logps"] = base + 0.3 * torch.randn(base.shape, generator=gen)
    inputs["ref_per_token_logps"] = base + 0.2 * torch.randn(base.shape, generator=gen)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum() * 3  # a generation batch 3× this one
    return inputs


def _flat_grad(model) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _trl_loss(trainer, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, float]]:
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), _flat_grad(trainer.model), metrics


def _our_loss(
    model, inputs: dict[str, Tensor], cfg: GRPOLossConfig, **scaling: int
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    logps, entropies = _logps_entropies(model, inputs)
    loss, metrics = grpo_loss(
        logps,
        inputs.get("old_per_token_logps"),
        inputs["ref_per_token_logps"] if cfg.beta else None,
        inputs["advantages"],
        inputs["completion_mask"],
        cfg,
        inputs["num_items_in_batch"],
        entropies=entropies,
        **scaling,
    )
    loss.backward()
    return loss.detach(), _flat_grad(model), metrics


@pytest.fixture
def configure(trl_setup: TRLSetup, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Set a GRPOLossConfig on the shared trainer for one test; attributes are restored after it."""

    def apply(cfg: GRPOLossConfig, grad_accum_steps: int = 1, steps_per_generation: int = 1) -> None:
        tr = trl_setup.trainer
        for name, value in {
            "beta": cfg.beta, "loss_type": cfg.loss_type, "epsilon_low": cfg.eps_low,
            "epsilon_high": cfg.eps_high, "importance_sampling_level": cfg.importance_sampling_level,
            "max_completion_length": cfg.max_completion_length,
            "current_gradient_accumulation_steps": grad_accum_steps,
            "top_entropy_quantile": cfg.top_entropy_quantile,
        }.items():  # fmt: skip
            monkeypatch.setattr(tr, name, value)
        monkeypatch.setattr(tr.args, "delta", cfg.delta)
        monkeypatch.setattr(tr.args, "use_bias_correction_kl", cfg.use_bias_correction_kl)
        monkeypatch.setattr(tr.args, "steps_per_generation", steps_per_generation)
        monkeypatch.setattr(tr.args, "sapo_temperature_neg", cfg.sapo_temperature_neg)
        monkeypatch.setattr(tr.args, "sapo_temperature_pos", cfg.sapo_temperature_pos)

    yield apply


def _assert_matches_trl(
    setup: TRLSetup, inputs: dict[str, Tensor], cfg: GRPOLossConfig, **scaling: int
) -> None:
    ref_loss, ref_grad, ref_metrics = _trl_loss(setup.trainer, inputs)
    loss, grad, metrics = _our_loss(setup.trainer.model, inputs, cfg, **scaling)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert ref_grad.abs().max() > 0
    for key, value in ref_metrics.items():
        if key != "entropy":
            assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    expected = {k for k in ref_metrics if k != "entropy"}
    assert expected <= metrics.keys()


@pytest.mark.parametrize("policy", ["on", "off"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_loss_matches_trl(trl_setup: TRLSetup, configure, loss_type, level, beta, policy) -> None:
    cfg = GRPOLossConfig(
        beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
        importance_sampling_level=level, max_completion_length=MAX_COMPLETION,
    )  # fmt: skip
    configure(cfg)
    inputs = dict(trl_setup.inputs)
    if policy == "on":
        del inputs["old_per_token_logps"]
    _assert_matches_trl(trl_setup, inputs, cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_delta_and_no_kl_correction_match_trl(trl_setup: TRLSetup, configure, loss_type) -> None:
    cfg = GRPOLossConfig(
        beta=0.04, epsilon=0.2, delta=1.1, loss_type=loss_type,
        use_bias_correction_kl=False, max_completion_length=MAX_COMPLETION,
    )  # fmt: skip
    configure(cfg)
    _assert_matches_trl(trl_setup, trl_setup.inputs, cfg)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_cispo_cap_and_sapo_temperatures_match_trl(trl_setup: TRLSetup, configure, loss_type) -> None:
    """cispo's epsilon_high is the absolute cap on ρ (TRL: ε_max, 5.0 recommended; here low so it binds)."""
    cfg = GRPOLossConfig(
        beta=0.04, epsilon_high=1.1, loss_type=loss_type, sapo_temperature_neg=2.0, sapo_temperature_pos=0.5,
        max_completion_length=MAX_COMPLETION,
    )  # fmt: skip
    configure(cfg)
    _assert_matches_trl(trl_setup, trl_setup.inputs, cfg)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.6])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_top_entropy_quantile_matches_trl(trl_setup: TRLSetup, configure, loss_type, quantile) -> None:
    cfg = GRPOLossConfig(
        beta=0.04, epsilon_high=0.28, loss_type=loss_type, top_entropy_quantile=quantile,
        max_completion_length=MAX_COMPLETION,
    )  # fmt: skip
    configure(cfg)
    _assert_matches_trl(trl_setup, trl_setup.inputs, cfg)


def test_top_entropy_quantile_keeps_the_high_entropy_share() -> None:
    from align.train.grpo_loss import high_entropy_mask

    entropies = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    kept = high_entropy_mask(entropies, mask, 0.5)  # 6 masked tokens: the top half by entropy
    assert kept.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert high_entropy_mask(entropies, torch.zeros_like(mask), 0.2).sum() == 0
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(entropies, None, None, torch.ones(2), mask, GRPOLossConfig(top_entropy_quantile=0.5), 6.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_gradient_accumulation_scaling_matches_trl(trl_setup: TRLSetup, configure, loss_type) -> None:
    cfg = GRPOLossConfig(beta=0.04, loss_type=loss_type, max_completion_length=MAX_COMPLETION)
    configure(cfg, grad_accum_steps=2, steps_per_generation=4)
    _assert_matches_trl(trl_setup, trl_setup.inputs, cfg, grad_accum_steps=2, steps_per_generation=4)


def _generate(setup: TRLSetup, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return setup.trainer._generate_and_score_completions(setup.batch)


@pytest.mark.parametrize("seed", [3, 4])  # seed 4 draws rows every reward returns None for (unscorable)
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(trl_setup: TRLSetup, monkeypatch: pytest.MonkeyPatch, scale_rewards, seed) -> None:
    tr = trl_setup.trainer
    monkeypatch.setattr(tr, "scale_rewards", scale_rewards)
    out = _generate(trl_setup, seed=seed)
    per_func = torch.tensor([list(tr._logs["rewards"][n])[-BATCH:] for n in tr.reward_func_names]).T
    rewards = torch.tensor(combine_scores(per_func.T.tolist(), REWARD_WEIGHTS), dtype=torch.float32)
    assert torch.isnan(per_func).any() and rewards.unique().numel() > 2
    assert torch.isnan(per_func).all(dim=1).any() == (seed == 4)
    adv = group_advantages(rewards, NUM_GENERATIONS, scale_rewards)
    torch.testing.assert_close(adv, out["advantages"], rtol=1e-6, atol=1e-6)
    zero_std = torch.isclose(reward_std(rewards, NUM_GENERATIONS, scale_rewards), torch.tensor(0.0))
    assert zero_std.float().mean().item() == pytest.approx(tr._metrics["train"]["frac_reward_zero_std"][-1])


def test_mask_truncated_completions_matches_trl(trl_setup: TRLSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = trl_setup.trainer
    plain = _generate(trl_setup, seed=5)
    monkeypatch.setattr(tr, "mask_truncated_completions", True)
    masked = _generate(trl_setup, seed=5)
    assert torch.equal(plain["completion_ids"], masked["completion_ids"])
    eos_ids = getattr(tr, "eos_token_ids", None) or [tr.processing_class.eos_token_id]  # attribute since trl 1.15
    ours = mask_truncated_completions(
        plain["completion_ids"], plain["completion_mask"], eos_ids, tr.processing_class.pad_token_id
    )
    kept = ours.any(-1)
    assert kept.any() and not kept.all()
    assert torch.equal(ours, masked["completion_mask"])
    assert ours.sum() == masked["num_items_in_batch"]
