"""train.micro_batch_size: auto (align/train/micro_batch.py): recipe rules, the split it chooses, and runs
that train on the same rows as an explicit split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.recipe import RecipeError, RMRecipe, SFTRecipe, load_recipe
from align.train import micro_batch
from align.train.sft import run_sft
from tests.train.test_sft import BASE, losses


def sft(*overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, [*BASE, *overrides])


def test_auto_parses_with_a_batch_size_and_refuses_the_other_combinations():
    train = sft("train.micro_batch_size=auto", "train.batch_size=16").train
    assert train.micro_batch_size == "auto" and train.batch_size == 16
    assert sft("train.micro_batch_size=4").train.micro_batch_size == 4
    with pytest.raises(RecipeError, match=r"'train.micro_batch_size: auto' needs 'train.batch_size'"):
        sft("train.micro_batch_size=auto")
    with pytest.raises(RecipeError, match=r"leave 'train.grad_accum' out"):
        sft("train.micro_batch_size=auto", "train.batch_size=16", "train.grad_accum=2")
    with pytest.raises(RecipeError, match=r"'train.batch_size' goes with 'train.micro_batch_size: auto'"):
        sft("train.batch_size=16")
    with pytest.raises(RecipeError, match=r"key 'train.micro_batch_size' expects int or one of 'auto', got 'big'"):
        sft("train.micro_batch_size=big")
    with pytest.raises(RecipeError, match=r"'train.micro_batch_size' must be >= 1, got 0"):
        sft("train.micro_batch_size=0")
    with pytest.raises(RecipeError, match=r"built for align sft"):
        load_recipe(RMRecipe, None, ["model.preset=tiny", "data.train=pairs.jsonl", "train.steps=1",
                                     "train.micro_batch_size=auto", "train.batch_size=8"])


def test_rows_per_step_and_the_candidate_splits():
    auto = sft("train.micro_batch_size=auto", "train.batch_size=24").train
    assert micro_batch.rows_per_step(auto, 2) == 24
    with pytest.raises(RecipeError, match=r"batch_size 24 does not split over 5 processes"):
        micro_batch.rows_per_step(auto, 5)
    fixed = sft("train.micro_batch_size=3", "train.grad_accum=2").train
    assert micro_batch.rows_per_step(fixed, 4) == 24
    assert micro_batch.candidates(12) == [12, 6, 4, 3, 2, 1]
    tried = []

    def fits(m):
        tried.append(m)
        return m <= 4

    assert micro_batch.largest_fitting(micro_batch.candidates(12), fits) == 4 and tried == [12, 6, 4]
    assert micro_batch.largest_fitting([2, 1], lambda m: False) is None


def test_optimizer_state_bytes_counts_what_the_first_step_allocates():
    weight = torch.nn.Parameter(torch.zeros(10, 3))
    frozen = torch.nn.Parameter(torch.zeros(5), requires_grad=False)
    optimizer = torch.optim.AdamW([weight, frozen])
    assert micro_batch.optimizer_state_bytes(optimizer) == 2 * 30 * 4
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert micro_batch.optimizer_state_bytes(optimizer) == 0


def test_auto_on_the_cpu_trains_the_same_steps_as_one_micro_batch(tmp_path: Path):
    """On the CPU auto takes each process's share of the step in one micro-batch: the run equals the explicit
    micro_batch_size = batch_size run."""
    run_sft(sft(f"output.run_dir={tmp_path / 'auto'}", "train.micro_batch_size=auto", "train.batch_size=16",
                "output.merge=false"))
    run_sft(sft(f"output.run_dir={tmp_path / 'set'}", "train.micro_batch_size=16", "output.merge=false"))
    assert losses(tmp_path / "auto") == losses(tmp_path / "set")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe measures CUDA memory")
def test_auto_on_cuda_probes_and_refuses_what_cannot_fit(tmp_path: Path, monkeypatch):
    """On the GPU the tiny model's whole share fits; with no memory allowed even one row is refused."""
    base = [f"output.run_dir={tmp_path / 'a'}", "train.micro_batch_size=auto", "train.batch_size=16",
            "output.merge=false", "train.steps=2", "train.deterministic=false"]
    run_sft(sft(*base))
    run_sft(sft(f"output.run_dir={tmp_path / 'b'}", "train.micro_batch_size=16", "output.merge=false",
                "train.steps=2", "train.deterministic=false"))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    monkeypatch.setattr(micro_batch, "HEADROOM", 1e-9)
    with pytest.raises(RecipeError, match=r"not even one row"):
        run_sft(sft(*base[1:], f"output.run_dir={tmp_path / 'c'}"))
