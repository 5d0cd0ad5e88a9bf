"""recipes/tiny_rm.yaml end to end, unshortened, on the tiny SFT model (the session's run of
recipes/tiny_sft.yaml, conftest.py): the reward model reaches its held-out pairwise accuracy, and its
final/ scores the same in transformers' own DeepseekV2ForSequenceClassification as in align's class; then the tiny
two-stage RL (recipes/tiny_rl.yaml, then recipes/tiny_rl_rm.yaml with this reward model) meets its target."""

from __future__ import annotations

import pytest
import torch

from align.models import DeepseekV2ForSequenceClassification
from align.train.metrics import read_metrics
from tests.test_cli import ROOT, run_cli


@pytest.fixture(scope="module")
def rm_run(tiny_sft_default):
    sft_dir, _ = tiny_sft_default
    run_dir = sft_dir.parent / "rm"
    result = run_cli("rm", str(ROOT / "recipes" / "tiny_rm.yaml"), f"model.path={sft_dir / 'final'}",
                     f"output.run_dir={run_dir}", "output.progress=false", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir, result.stdout


def test_tiny_rm_reaches_its_accuracy(rm_run):
    run_dir, out = rm_run
    final = [r for r in read_metrics(run_dir) if "eval/accuracy/borrow" in r][-1]
    assert final["eval/accuracy"] >= 0.95, final  # the recipe's target (README: measured figures)
    assert final["eval/reward_chosen_mean"] > final["eval/reward_rejected_mean"]
    assert f"eval/accuracy: {final['eval/accuracy']:.4f}" in out


def test_tiny_rm_final_scores_the_same_in_transformers(rm_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = rm_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    texts = ["User: What is 52 - 17?\n\nAssistant: 35", "User: What is 52 - 17?\n\nAssistant: 45",
             "User: What is 8 + 9?\n\nAssistant: 17"]
    batch = tokenizer([tokenizer.bos_token + t + tokenizer.eos_token for t in texts], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    ours = DeepseekV2ForSequenceClassification.from_pretrained(run_dir / "final")
    theirs = AutoModelForSequenceClassification.from_pretrained(run_dir / "final", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def stage2(rm_run, tmp_path_factory):
    """Stage 1 (recipes/tiny_rl.yaml) from the tiny SFT model, then stage 2 (recipes/tiny_rl_rm.yaml) from its final
    with this module's reward model: (stage 2's run dir, stdout)."""
    rm_dir, _ = rm_run
    base = rm_dir.parent
    if not (base / "rl" / "final" / "config.json").is_file():  # tests/test_tiny_default.py may have run it
        rl = run_cli("rl", str(ROOT / "recipes" / "tiny_rl.yaml"), f"model.path={base / 'sft' / 'final'}",
                     f"output.run_dir={base / 'rl'}", "output.progress=false", timeout=900)
        assert rl.returncode == 0, rl.stdout[-4000:] + rl.stderr[-4000:]
    recipe = tmp_path_factory.mktemp("stage2") / "tiny_rl_rm.yaml"
    text = (ROOT / "recipes" / "tiny_rl_rm.yaml").read_text()
    assert "model: runs/tiny_rm/final" in text
    recipe.write_text(text.replace("model: runs/tiny_rm/final", f"model: {rm_dir / 'final'}"))
    run_dir = base / "rl_rm"
    result = run_cli("rl", str(recipe), f"model.path={base / 'rl' / 'final'}", f"output.run_dir={run_dir}",
                     "output.progress=false", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir, result.stdout


def test_stage2_raises_the_rm_score_and_keeps_exact_match(stage2):
    """The issue's target for the tiny two-stage default: the mean RM score of the held-out greedy replies rises,
    and their exact match drops by at most 2 points (README: measured figures)."""
    run_dir, _ = stage2
    (before, after) = [r for r in read_metrics(run_dir) if "eval/exact_match" in r]
    assert (before["step"], after["step"]) == (0, 40)
    assert after["eval/rewards/reward_model/mean"] > before["eval/rewards/reward_model/mean"], (before, after)
    assert after["eval/exact_match"] >= before["eval/exact_match"] - 0.02 - 1e-9, (before, after)
