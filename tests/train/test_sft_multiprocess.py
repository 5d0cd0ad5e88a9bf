"""Two CPU processes (gloo) give the same losses as one process with the same global batch:
LoRA through DDP, full fine-tuning through FSDP2 (fully_shard).

The 2-process run is `python -m torch.distributed.run --nproc_per_node 2 -m align.cli sft ...`
(what `accelerate launch` / `torchrun` do); the 1-process reference runs the same recipe with
grad_accum doubled, so both steps see the same rows in the same micro-batches. Tolerance: 1e-4
relative. The two differ only in the order of float32 gradient sums (all-reduce vs accumulation),
which Adam turns into ~1e-6 relative loss differences over these few steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.recipe import SFTRecipe, load_recipe
from align.train.metrics import read_metrics
from align.train.sft import run_sft

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=64", "data.synthetic.test=8",
    "data.max_length=48", "data.packing=true", "train.steps=4", "train.micro_batch_size=2", "train.bf16=false",
    "optim.lr=5e-3", "output.progress=false", "output.merge=false", "eval.batch_size=8", "train.log_every=1",
    "schedule.warmup_steps=0",
]
RTOL = 1e-4
TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_sft.yaml"


def two_processes(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return launch_two("sft", TINY, [*BASE, *overrides, f"output.run_dir={run_dir}"])


def launch_two(command: str, recipe: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`align <command> <recipe> <args>` in two processes, as torchrun launches it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    line = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "align.cli", command, str(recipe), *args]
    return subprocess.run(line, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(run_dir: Path, overrides: list[str]) -> None:
    run_sft(load_recipe(SFTRecipe, TINY, [*BASE, *overrides, f"output.run_dir={run_dir}"]))


def curve(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.parametrize("mode, overrides", [
    ("ddp", ["lora.r=4", "lora.routed_experts=true", "optim.lr=2e-2"]),
    ("fsdp", ["lora=null"]),
])
def test_two_processes_match_one(tmp_path, mode, overrides):
    result = two_processes(tmp_path / "two", [*overrides, "train.grad_accum=1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"2 process(es), {mode}" in result.stdout
    one_process(tmp_path / "one", [*overrides, "train.grad_accum=2"])
    two, one = curve(tmp_path / "two"), curve(tmp_path / "one")
    assert sorted(two) == [1, 2, 3, 4]
    assert two == pytest.approx(one, rel=RTOL)
    assert curve(tmp_path / "two", "eval/loss") == pytest.approx(curve(tmp_path / "one", "eval/loss"), rel=RTOL)
    state = (tmp_path / "two" / "checkpoints" / "step-000004")
    assert (state / ("adapter" if mode == "ddp" else "model")).is_dir()
    assert (state / "rng" / "rank-1.json").is_file()


def test_fsdp_resume_in_two_processes(tmp_path):
    """Sharded full fine-tuning resumes exactly: the gathered optimizer state is re-sharded."""
    first = two_processes(tmp_path / "a", ["lora=null", "train.save_every=2"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = two_processes(tmp_path / "b", ["lora=null", f"resume_from={tmp_path / 'a/checkpoints/step-000002'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert sorted(b) == [3, 4]
    assert b == pytest.approx({k: a[k] for k in (3, 4)}, rel=1e-6)
