"""GRPO in two CPU processes (gloo; `torchrun --nproc_per_node 2 -m align.cli rl`): each process generates,
scores and trains its half of the step's prompts, and the metrics equal a one-process run of the same
global batch and seeds (LoRA through DDP, full fine-tuning through FSDP2); a two-process resume is exact, and
one process continues a two-process checkpoint as two would;
one process's failure stops both with its error. Launch and tolerance as tests/train/test_sft_multiprocess.py
(the processes differ from one only in the order of float32 sums)."""

from __future__ import annotations

import json
import os
import time

import pytest

from align.recipe import RLRecipe, load_recipe
from align.train.grpo import run_rl
from align.train.metrics import read_metrics
from tests.train.test_sft_multiprocess import RTOL, launch_two

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=256", "data.synthetic.test=16",
    "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=4", "grpo.micro_batch_size=4",
    "grpo.scale_rewards=batch", "train.steps=4", "train.save_every=2", "train.bf16=false", "train.log_every=1",
    "output.progress=false", "output.merge=false", "eval.max_new_tokens=4", "optim.lr=1e-2",
    "schedule.warmup_steps=0",
]
SKIP = ("time",)  # wall-clock: "time" and time/*, per process


HERE = "tests.train.test_grpo_multiprocess"
REWARDS = ("exact_match", f"{HERE}:token_share")


def token_share(prompts, completions, completion_ids, **columns):
    """A reward a random tiny model's completions differ in: the share of token ids divisible by 3."""
    return [sum(t % 3 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def recipe_file(tmp_path, rewards=REWARDS):
    penalty = {"name": "length_penalty", "params": {"target": 2, "max_length": 4}, "weight": 0.1}
    path = tmp_path / "rl.yaml"
    path.write_text(json.dumps({"data": {"synthetic": {}}, "rewards": [*rewards, penalty]}))
    return path


def two(tmp_path, run_dir, overrides, rewards=REWARDS, timeout=300):
    return launch_two("rl", recipe_file(tmp_path, rewards), [*BASE, *overrides, f"output.run_dir={run_dir}"], timeout)


def records(run_dir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if not k.startswith(SKIP)})
    return out


def assert_same(got: dict[int, dict], want: dict[int, dict], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for step, record in want.items():
        assert sorted(got[step]) == sorted(record), step
        for key, value in record.items():
            assert got[step][key] == pytest.approx(value, rel=rel, abs=1e-6, nan_ok=True), (step, key)


@pytest.mark.parametrize("mode, overrides", [
    ("ddp", ["lora.r=4", "grpo.beta=0.04"]),
    ("fsdp", ["lora=null", "grpo.beta=0.04", "grpo.num_iterations=2"]),  # reference sharded too; old policy
])
def test_two_processes_match_one_and_resume_exactly(tmp_path, mode, overrides):
    result = two(tmp_path, tmp_path / "two", overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"2 process(es), {mode}, 2 prompts each per round" in result.stdout
    run_rl(load_recipe(RLRecipe, recipe_file(tmp_path), [*BASE, *overrides, f"output.run_dir={tmp_path / 'one'}"]))
    both, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert_same(both, one, RTOL)
    assert all(one[s]["reward/std"] > 0 and one[s]["advantages/std"] > 0 for s in (1, 2, 3, 4))  # signal

    resumed = two(tmp_path, tmp_path / "b", [*overrides, f"resume_from={tmp_path / 'two/checkpoints/step-000002'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = records(tmp_path / "b")
    assert_same({k: v for k, v in again.items() if k in (3, 4)}, {k: both[k] for k in (3, 4)}, 1e-6)

    # the two processes' checkpoint continued by one process: the same rounds (the noise is keyed per prompt)
    checkpoint = f"resume_from={tmp_path / 'two/checkpoints/step-000002'}"
    run_rl(load_recipe(RLRecipe, recipe_file(tmp_path), [*BASE, *overrides, f"output.run_dir={tmp_path / 'c'}",
                                                         checkpoint]))
    alone = records(tmp_path / "c")
    assert_same({k: v for k, v in alone.items() if k in (3, 4)}, {k: both[k] for k in (3, 4)}, RTOL)


class RewardCrash(BaseException):
    """A failure the reward registry does not absorb into a None score (as it does an Exception)."""


def crash_on_process_one(prompts, completions, **columns):
    if os.environ.get("RANK") == "1":
        raise RewardCrash("reward blew up on purpose")
    return [0.0] * len(completions)


def test_one_process_failing_stops_both(tmp_path):
    start = time.monotonic()
    result = two(tmp_path, tmp_path / "fail", ["lora.r=4"], rewards=(f"{HERE}:crash_on_process_one",),
                 timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - start < 240
    out = result.stdout + result.stderr
    assert "RewardCrash: reward blew up on purpose" in out
    assert "failed on process 1 of 2" in out  # what process 0 raised, instead of waiting


def test_prompts_per_step_divides_by_the_processes():
    from types import SimpleNamespace

    from align.train.data_parallel import step_span

    spans = [step_span(8, SimpleNamespace(num_processes=4, process_index=r)) for r in range(4)]
    assert spans == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError, match=r"prompts_per_step=6 \(global\) does not divide by the 4 processes.*4 or 8"):
        step_span(6, SimpleNamespace(num_processes=4, process_index=0))
