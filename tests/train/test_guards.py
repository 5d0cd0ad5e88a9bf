"""Runs that go wrong stop, with the step, exit code 1 and no NaN checkpoint: a NaN / inf loss or
gradient norm (SFT and GRPO; every process agrees), NaN weights before a save, GRPO rounds without any
reward value. Reward errors are logged as counts, with totals at the end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.recipe import RLRecipe, SFTRecipe, load_recipe
from align.train import checkpointing as ckpt
from align.train import grpo, sft
from align.train.errors import TrainingStopped
from align.train.metrics import read_metrics

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_sft.yaml"
SFT = [
    "model.config.num_hidden_layers=1", "data.synthetic.train=64", "data.synthetic.test=8", "train.steps=4",
    "train.micro_batch_size=8", "train.save_every=1", "train.eval_every=0", "train.log_every=1",
    "eval.exact_match=false", "output.progress=false", "output.merge=false", "eval.batch_size=8",
]
RL = [
    "model.preset=tiny", "model.config.num_hidden_layers=1", "data.synthetic.train=64", "data.synthetic.test=8",
    "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=4", "grpo.micro_batch_size=6",
    "train.steps=4", "train.bf16=false", "train.sample_every=0", "output.progress=false", "output.merge=false",
    "eval.exact_match=false", "optim.lr=1e-3",
]


def no_value(prompts, completions, **columns):
    return [None] * len(completions)


def boom(prompts, completions, **columns):
    raise RuntimeError("reward server down")


def rl_recipe(tmp_path: Path, rewards: list, *overrides: str) -> RLRecipe:
    path = tmp_path / "rl.yaml"
    path.write_text(json.dumps({"data": {"synthetic": {}}, "rewards": rewards}))
    return load_recipe(RLRecipe, path, [*RL, f"output.run_dir={tmp_path / 'run'}", *overrides])


def nan_on_calls(monkeypatch, module, name: str, calls: set[int]) -> None:
    """Make module.name return a NaN loss (first result) on the given 1-based calls."""
    real, seen = getattr(module, name), []

    def poisoned(*args, **kwargs):
        seen.append(1)
        out = real(*args, **kwargs)
        return (out[0] * math.nan, *out[1:]) if len(seen) in calls else out

    monkeypatch.setattr(module, name, poisoned)


def test_a_nan_loss_stops_the_run_with_exit_1_and_the_step(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, sft, "trained_token_loss", {3})
    run = tmp_path / "run"
    assert main(["sft", str(TINY), *SFT, f"output.run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "error: step 3: not finite (train/loss nan" in err and "train.max_nonfinite_steps=0" in err
    assert f"newest checkpoint: {ckpt.checkpoint_dir(run, 2)}" in err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not (run / "final").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, sft, "trained_token_loss", {2})
    run = tmp_path / "run"
    sft.run_sft(load_recipe(SFTRecipe, TINY, [*SFT, f"output.run_dir={run}", "train.max_nonfinite_steps=1"]))
    records = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 3, 4] and all(r["train/loss"] is not None for r in records)
    assert records[-1]["train/nonfinite_steps"] == 1
    assert ckpt.read_trainer_state(ckpt.checkpoint_dir(run, 4))["nonfinite_steps"] == 1
    one, two = (load_file(ckpt.checkpoint_dir(run, s) / "model" / "model.safetensors") for s in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed no weight


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real, calls = sft.train_step, []

    def poisoning(setup, *args, **kwargs):
        out = real(setup, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(p for p in setup.model.parameters() if p.requires_grad).fill_(math.nan)
        return out

    monkeypatch.setattr(sft, "train_step", poisoning)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"step 2: the trained weights hold NaN / inf values"):
        sft.run_sft(load_recipe(SFTRecipe, TINY, [*SFT, f"output.run_dir={run}"]))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001"]


AGREE = """
import sys
from pathlib import Path
import torch
from accelerate import Accelerator
from align.train.guards import any_nonfinite
acc = Accelerator(cpu=True)
bad = float("nan") if acc.process_index == 1 else 1.0
answers = any_nonfinite(torch.tensor([1.0, bad]), acc), any_nonfinite(torch.tensor([1.0, 2.0]), acc)
Path(sys.argv[1], f"rank-{acc.process_index}").write_text(repr(answers))
"""


def test_every_process_agrees_on_a_nonfinite_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0's own values were finite: it learns of rank 1's NaN through the all-reduce
    assert [(tmp_path / f"rank-{r}").read_text() for r in (0, 1)] == ["(True, False)", "(True, False)"]


def test_rl_stops_after_rounds_without_any_reward_value(tmp_path, capsys):
    recipe = rl_recipe(tmp_path, ["tests.train.test_guards:no_value"], "grpo.max_failed_reward_steps=2")
    with pytest.raises(TrainingStopped, match=r"step 2: no reward gave a value for 2 round\(s\) in a row "
                                              r"\(tests.train.test_guards:no_value returned None for all 16\)"):
        grpo.run_rl(recipe)
    assert "warning: step 1: no reward gave a value" in capsys.readouterr().out


def test_rl_reward_errors_are_counts_with_totals(tmp_path, capsys):
    rewards = ["exact_match", {"name": "tests.train.test_guards:boom", "label": "boom"}]
    result = grpo.run_rl(rl_recipe(tmp_path, rewards, "train.log_every=2"))
    records = read_metrics(tmp_path / "run")
    assert [r["rewards/boom/errors"] for r in records if "rewards/boom/errors" in r] == [2.0, 2.0]
    assert records[-1]["rewards/boom/errors_total"] == 4.0 and result["rewards/boom/errors_total"] == 4.0
    assert records[-1]["rewards/exact_match/errors_total"] == 0.0
    assert "reward errors (the function raised; the round scored it None): boom in 4 of 4 rounds" in (
        capsys.readouterr().out)


def test_rl_nan_loss_stops_the_run(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, grpo, "grpo_loss", {4, 5, 6})  # round 2's three micro-batches
    with pytest.raises(TrainingStopped, match=r"step 2: not finite \(train/loss nan"):
        grpo.run_rl(rl_recipe(tmp_path, ["exact_match"], "train.save_every=1", "train.log_every=1"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r] == [1]
