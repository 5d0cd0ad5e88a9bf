"""`align rm` in two CPU processes (gloo) gives the losses and held-out metrics of one process with the same global
batch: LoRA through DDP, full fine-tuning through FSDP2. Launch and tolerance as tests/train/test_sft_multiprocess.py
(`python -m torch.distributed.run --nproc_per_node 2 -m align.cli rm ...`; the 1-process reference doubles
grad_accum, so both steps see the same pairs in the same micro-batches)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.recipe import RMRecipe, load_recipe
from align.train.rm import run_rm
from tests.train.test_rm import BASE
from tests.train.test_sft_multiprocess import RTOL, curve

TINY_RM = Path(__file__).resolve().parents[2] / "recipes" / "tiny_rm.yaml"
OVERRIDES = ["model.path=null", *BASE, "train.deterministic=false", "schedule.warmup_steps=0", "train.log_every=1",
             "train.eval_every=2", "train.save_every=4"]


def two_processes(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "align.cli", "rm", str(TINY_RM), *OVERRIDES, *overrides, f"output.run_dir={run_dir}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode, overrides", [("ddp", ["lora.r=4", "optim.lr=1e-2"]), ("fsdp", ["lora=null"])])
def test_two_processes_match_one(tmp_path, mode, overrides):
    result = two_processes(tmp_path / "two", [*overrides, "train.grad_accum=1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"2 process(es), {mode}" in result.stdout
    run_rm(load_recipe(RMRecipe, TINY_RM, [*OVERRIDES, *overrides, "train.grad_accum=2",
                                           f"output.run_dir={tmp_path / 'one'}"]))
    two, one = curve(tmp_path / "two"), curve(tmp_path / "one")
    assert sorted(two) == [1, 2, 3, 4]
    assert two == pytest.approx(one, rel=RTOL)
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/accuracy/borrow", "eval/accuracy/random"):
        assert curve(tmp_path / "two", key) == pytest.approx(curve(tmp_path / "one", key), rel=RTOL, abs=1e-6), key
    assert (tmp_path / "two" / "final" / "config.json").is_file()
