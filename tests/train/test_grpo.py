"""The GRPO loop (align.train.grpo) on a tiny random model: log-probs, which passes run, resume,
feedback files and user errors. The loss itself is checked against TRL in test_grpo_loss.py."""

from __future__ import annotations

import json

import pytest
import torch

from align.recipe import RecipeError, RLRecipe, load_recipe
from align.train import grpo
from align.train.metrics import read_metrics
from align.train.rollout_batch import completion_logprobs, completion_logprobs_entropy, make_batch

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=256", "data.synthetic.test=16",
    "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=4", "grpo.micro_batch_size=6",
    "train.steps=2", "train.bf16=false", "train.sample_every=1", "output.progress=false", "output.merge=false",
    "eval.max_new_tokens=4", "optim.lr=1e-3",
]


def recipe(run_dir, *overrides: str) -> RLRecipe:
    penalty = {"name": "length_penalty", "params": {"target": 2, "max_length": 4}, "weight": 0.1}
    data = {"data": {"synthetic": {}}, "rewards": ["exact_match", penalty]}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return load_recipe(RLRecipe, path, [*BASE, f"output.run_dir={run_dir}", *overrides])


def test_completion_logprobs_equal_log_softmax_of_full_logits():
    from align.models import build_model

    model = build_model("tiny", num_hidden_layers=2, seed=3).eval()
    prompts, completions = [[0, 5, 9], [0, 7, 8, 11, 12], [0, 4]], [[20, 21, 1], [30], [40, 41, 42, 43]]
    batch = make_batch(prompts, completions, torch.zeros(3), pad_id=2)
    with torch.no_grad():
        ours = completion_logprobs(model, model.get_output_embeddings(), batch, temperature=0.7)
        same, entropy = completion_logprobs_entropy(model, model.get_output_embeddings(), batch, temperature=0.7)
        torch.testing.assert_close(same, ours)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double() / 0.7
            logp = logits.log_softmax(-1)[len(p) - 1 : len(p) + len(c) - 1]  # [len(c), V]
            expected = logp.gather(1, torch.tensor(c)[:, None])
            torch.testing.assert_close(ours[i, : len(c)].double(), expected.squeeze(1), rtol=1e-5, atol=1e-5)
            assert ours[i, len(c) :].eq(0).all()
            exact = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(entropy[i, : len(c)].double(), exact, rtol=1e-4, atol=1e-5)


def test_engine_logprobs_agree_with_the_training_path():
    """The rollout engine's sampled-token log-probs equal the training forward's (float32)."""
    from align.generation import GenerationEngine
    from align.models import build_model

    model = build_model("tiny", num_hidden_layers=2, seed=4)
    prompts = [[0, 5, 9, 13], [0, 7]]
    out = GenerationEngine(model).generate(prompts, max_new_tokens=5, temperature=0.8, n=3, seed=0)
    flat = [(p, c) for p, cs in zip(prompts, out, strict=True) for c in cs]
    batch = make_batch([p for p, _ in flat], [c.token_ids for _, c in flat], torch.zeros(len(flat)), pad_id=2)
    with torch.no_grad():
        train = completion_logprobs(model.eval(), model.get_output_embeddings(), batch, temperature=0.8)
    for i, (_, c) in enumerate(flat):
        torch.testing.assert_close(train[i, : len(c.token_ids)], torch.tensor(c.logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "passes"),
    [
        ([], 0),  # beta 0, mu 1: neither an old-policy nor a reference pass
        (["grpo.num_iterations=2"], 2),  # one old-policy pass per round
        (["grpo.beta=0.04"], 2),  # full FT: one reference pass (frozen copy) per round
        (["grpo.beta=0.04", "lora.r=4", "grpo.num_iterations=2"], 4),  # LoRA: old + adapters-off reference
    ],
)
def test_old_and_reference_passes_only_when_needed(tmp_path, monkeypatch, overrides, passes):
    calls = []
    real = grpo.frozen_logprobs
    monkeypatch.setattr(grpo, "frozen_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    grpo.run_rl(recipe(tmp_path / "run", *overrides))
    assert len(calls) == passes
    records = read_metrics(tmp_path / "run")
    has_kl = [("train/kl" in r) for r in records if "train/loss" in r]
    assert all(has_kl) == ("grpo.beta=0.04" in overrides)


def test_num_iterations_uses_old_logprobs(tmp_path, monkeypatch):
    """mu = 2: the first step's ratio is 1 (old = current weights); the second step sees moved weights."""
    seen = []
    real = grpo.grpo_loss

    def spy(logps, old_logps, *args, **kwargs):
        assert old_logps is not None
        mask = args[2].bool()
        seen.append((logps.detach() - old_logps)[mask].abs().max().item())
        return real(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    grpo.run_rl(recipe(tmp_path / "run", "grpo.num_iterations=2", "train.steps=1", "grpo.micro_batch_size=64"))
    assert len(seen) == 2 and seen[0] < 1e-5 < seen[1]


def test_resume_continues_exactly(tmp_path):
    grpo.run_rl(recipe(tmp_path / "full", "train.steps=4", "train.save_every=2", "train.log_every=1"))
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    grpo.run_rl(recipe(tmp_path / "resumed", "train.steps=4", "train.log_every=1", f"resume_from={ckpt}"))
    full = {r["step"]: r for r in read_metrics(tmp_path / "full") if "train/loss" in r}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "resumed") if "train/loss" in r}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("train/loss", "reward/mean", "completions/mean_length", "train/grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)


def test_feedback_files_and_metrics(tmp_path):
    result = grpo.run_rl(recipe(tmp_path / "run", "grpo.mask_truncated_completions=true", "train.log_every=1"))
    run = tmp_path / "run"
    records = read_metrics(run)
    assert records[0]["step"] == 0 and "eval/exact_match" in records[0]
    assert records[-1]["step"] == 2 and "eval/exact_match" in records[-1]
    assert "start/eval/exact_match" in result and "eval/exact_match" in result
    step = next(r for r in records if "train/loss" in r)
    for key in ("reward/mean", "reward/std", "rewards/exact_match/mean", "rewards/length_penalty/mean",
                "advantages/std", "train/clip_ratio/region_mean", "train/entropy", "completions/mean_length",
                "completions/max_length", "completions/truncated_fraction", "time/generation", "time/scoring",
                "time/update", "train/lr", "train/grad_norm"):
        assert key in step, key
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert len(samples[0]["completions"]) == 4 and "reward" in samples[0]["completions"][0]
    assert (run / "checkpoints" / "step-000002" / "model" / "config.json").is_file()


def test_lora_run_saves_an_adapter_and_merged_final(tmp_path):
    grpo.run_rl(recipe(tmp_path / "run", "lora.r=4", "output.merge=true", "train.steps=1"))
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_bad_reward_and_bad_prompt_rows(tmp_path):
    with pytest.raises(RecipeError, match="exact_mach"):
        load_recipe(RLRecipe, None, ["model.preset=tiny", "data.synthetic.train=8", "rewards=[exact_mach]"])
    with pytest.raises(RecipeError, match="'rewards' is empty"):
        load_recipe(RLRecipe, None, ["model.preset=tiny", "data.synthetic.train=8"])
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"question": "oops"}\n')
    bad = recipe(tmp_path / "bad", "data.synthetic=null", f"data.train={rows}")
    with pytest.raises(ValueError, match=r"prompts.jsonl row 2: no 'prompt' column \(columns: question\)"):
        grpo.run_rl(bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()
    skipped = recipe(tmp_path / "skip", "data.synthetic=null", f"data.train={rows}", "data.on_error=skip",
                     "train.steps=1", "grpo.prompts_per_step=1", "eval.exact_match=false")
    grpo.run_rl(skipped)
    assert (tmp_path / "skip" / "checkpoints" / "step-000001").is_dir()
