"""`align rm` in one process: the loss against TRL's formula, resume equality, LoRA, gradient accumulation,
the final checkpoint in transformers. Tiny shapes; every run takes a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.recipe import RMRecipe, load_recipe
from align.train.metrics import read_metrics
from align.train.rm import run_rm
from align.train.rm_loss import pair_losses, pair_metrics, pair_sums

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=64", "data.synthetic.test=16",
    "data.max_length=32", "train.steps=4", "train.micro_batch_size=8", "train.bf16=false", "optim.lr=3e-3",
    "output.progress=false", "eval.batch_size=16", "train.deterministic=true",
]


def recipe(run_dir: Path, *overrides: str) -> RMRecipe:
    return load_recipe(RMRecipe, None, [*BASE, f"output.run_dir={run_dir}", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_loss_is_trl_reward_trainer_formula():
    chosen, rejected, margin = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.3, 0, 1])
    trl = -F.logsigmoid(chosen - rejected - margin).mean() + 0.01 * torch.mean((chosen + rejected) ** 2)
    assert pair_losses(chosen, rejected, margin, 0.01).mean() == pytest.approx(trl.item(), rel=1e-6)
    metrics = pair_metrics(pair_sums(pair_losses(chosen, rejected), chosen, rejected), 3, "eval")
    assert metrics["eval/accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["eval/margin"] == pytest.approx((chosen - rejected).mean().item())
    assert metrics["eval/reward_chosen_std"] == pytest.approx(chosen.std(unbiased=False).item(), rel=1e-6)


def test_resume_continues_exactly_and_final_loads_in_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    a, b = tmp_path / "a", tmp_path / "b"
    metrics = run_rm(recipe(a, "train.steps=6", "train.save_every=3"))
    assert {"eval/accuracy", "eval/margin", "eval/reward_chosen_mean", "eval/accuracy/borrow"} <= set(metrics)
    run_rm(recipe(b, "train.steps=6", f"resume_from={a / 'checkpoints' / 'step-000003'}"))
    for step in (4, 5, 6):
        assert losses(b)[step] == pytest.approx(losses(a)[step], rel=1e-6, abs=1e-7), step
    config = json.loads((a / "final" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForSequenceClassification"] and config["pad_token_id"] is not None
    theirs = AutoModelForSequenceClassification.from_pretrained(a / "final", attn_implementation="eager")
    assert theirs.score.weight.shape[0] == 1


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    run_rm(recipe(tmp_path / "big", "train.micro_batch_size=8"))
    run_rm(recipe(tmp_path / "acc", "train.micro_batch_size=4", "train.grad_accum=2"))
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)


def test_lora_trains_the_score_head_and_merges(tmp_path):
    run_rm(recipe(tmp_path, "lora.r=4", "optim.lr=1e-2"))
    from align.models import DeepseekV2ForSequenceClassification

    final = DeepseekV2ForSequenceClassification.from_pretrained(tmp_path / "final")
    start = DeepseekV2ForSequenceClassification.from_pretrained(tmp_path / "base")
    assert not torch.equal(final.score.weight, start.score.weight)
    assert set(final.state_dict()) == set(start.state_dict())


def test_missing_rejected_column_names_the_file(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"chosen": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl: preference data needs 'chosen' and 'rejected'"):
        run_rm(load_recipe(RMRecipe, None, [*BASE[:2], "data.synthetic=null", f"data.train={data}",
                                            f"output.run_dir={tmp_path / 'run'}", "train.steps=1"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_resume_restores_the_score_head(tmp_path):
    lora = ["lora.r=4", "optim.lr=1e-2", "train.steps=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_rm(recipe(a, *lora, "train.save_every=3"))
    run_rm(recipe(b, *lora, f"resume_from={a / 'checkpoints' / 'step-000003'}"))
    for step in (4, 5, 6):
        assert losses(b)[step] == pytest.approx(losses(a)[step], rel=1e-6, abs=1e-7), step


def test_likeliest_mistakes_are_one_digit_changes_of_the_right_answer(tmp_path):
    from align.models import build_model
    from align.train.rm import likeliest_mistakes
    from data_tools.synthetic import solve
    from data_tools.tokenizer import load_tokenizer

    build_model("tiny", num_hidden_layers=2, seed=0).save_pretrained(tmp_path / "lm")
    problems = [(52, "-", 17), (8, "+", 9), (99, "+", 99), (3, "-", 3)]
    lm = recipe(tmp_path / "run", "model.preset=null", "model.config={}", f"model.path={tmp_path / 'lm'}")
    mistakes = likeliest_mistakes(lm, load_tokenizer("tiny"))
    for (a, op, b), (wrong, p) in zip(problems, mistakes(problems), strict=True):
        right = str(solve(a, op, b))
        assert wrong != right and len(wrong) == len(right) and (wrong[0] != "0" or len(wrong) == 1) and 0 < p < 1
        assert sum(x != y for x, y in zip(wrong, right, strict=True)) == 1
    with pytest.raises(ValueError, match="model.path must be a causal-LM checkpoint"):
        likeliest_mistakes(recipe(tmp_path / "run"), load_tokenizer("tiny"))
