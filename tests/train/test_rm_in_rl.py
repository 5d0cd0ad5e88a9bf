"""An `align rm` checkpoint as the reward of `align rl`: loaded on align's class, scored in the rounds and on
the held-out greedy replies (eval.rewards). Tiny shapes, a few seconds."""

from __future__ import annotations

import json

from align.recipe import RLRecipe, RMRecipe, load_recipe
from align.train import grpo
from align.train.metrics import read_metrics
from align.train.rm import run_rm
from tests.train.test_grpo import BASE


def test_reward_model_reward_in_rl_rounds_and_eval(tmp_path):
    rm_dir = tmp_path / "rm"
    run_rm(load_recipe(RMRecipe, None, [
        "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=32", "data.synthetic.test=8",
        "data.max_length=32", "train.steps=2", "train.micro_batch_size=8", "train.bf16=false",
        "output.progress=false", f"output.run_dir={rm_dir}"]))
    rewards = [{"name": "reward_model", "params": {"model": str(rm_dir / "final"), "device": "cpu"}},
               {"name": "format", "weight": 0.2, "params": {"pattern": r"\s*\d+\s*"}}]
    path = tmp_path / "rl.yaml"
    path.write_text(json.dumps({"data": {"synthetic": {}}, "rewards": rewards}))
    result = grpo.run_rl(load_recipe(RLRecipe, path, [*BASE, f"output.run_dir={tmp_path / 'rl'}", "eval.rewards=true"]))
    assert {"eval/reward/mean", "eval/rewards/reward_model/mean", "eval/rewards/format/mean"} <= set(result)
    assert "start/eval/rewards/reward_model/mean" in result
    records = read_metrics(tmp_path / "rl")
    assert any("rewards/reward_model/mean" in r for r in records)
    assert result["rewards/reward_model/errors_total"] == 0
