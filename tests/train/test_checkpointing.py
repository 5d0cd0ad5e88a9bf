"""Checkpoint files carry no code: a crafted pickle anywhere in a checkpoint is never unpickled on
resume (the run stops with a one-line error naming the file), and the RNG / scheduler / optimizer
state round-trips exactly through safetensors + JSON."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from align.cli import main
from align.models.checkpoint import CheckpointError
from align.recipe import SFTRecipe, load_recipe
from align.train import checkpointing as ckpt
from align.train.sft import run_sft

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_sft.yaml"
BASE = [
    "model.config.num_hidden_layers=1", "data.synthetic.train=32", "data.synthetic.test=8", "train.steps=2",
    "train.micro_batch_size=8", "train.save_every=0", "train.eval_every=0", "eval.exact_match=false",
    "output.progress=false", "output.merge=false", "eval.batch_size=8",
]


class Payload:
    """Unpickling this creates `marker`: proof that the file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    run_sft(load_recipe(SFTRecipe, TINY, [*BASE, f"output.run_dir={run}"]))
    return ckpt.checkpoint_dir(run, 2)


def crafted(saved: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of the checkpoint with file `name` replaced by a pickle whose loading runs code."""
    copy = tmp_path / "step-000002"
    shutil.copytree(saved, copy)
    marker = tmp_path / "payload-ran"
    (copy / name).write_bytes(pickle.dumps(Payload(marker)))
    return copy, marker


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.json", "scheduler.json", "rng/rank-0.json",
                                  "trainer_state.json", "recipe.yaml"])
def test_a_crafted_pickle_is_never_unpickled(saved, tmp_path, capsys, name):
    copy, marker = crafted(saved, tmp_path, name)
    code = main(["sft", str(TINY), *BASE, f"output.run_dir={tmp_path / 'resumed'}", f"resume_from={copy}"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(copy / name) in errors[0], err  # one line, naming the file
    assert "Traceback" not in err
    assert not (tmp_path / "resumed").exists()  # the failed fresh run left nothing behind


def test_the_earlier_pickle_format_is_refused_unread(saved, tmp_path):
    copy, marker = crafted(saved, tmp_path, "optimizer.pt")
    (copy / "scheduler.pt").write_bytes(pickle.dumps(Payload(marker)))
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json"):
        (copy / name).unlink()
    recipe = load_recipe(SFTRecipe, TINY, [*BASE, f"output.run_dir={tmp_path / 'r'}", f"resume_from={copy}"])
    with pytest.raises(CheckpointError, match=r"earlier pickle format \(optimizer.pt, scheduler.pt\)"):
        run_sft(recipe)
    assert not marker.exists()


def test_state_files_are_plain_data(saved):
    assert not list(saved.rglob("*.pt")) and not list(saved.rglob("*.bin"))
    assert (saved / "optimizer.safetensors").is_file() and (saved / "rng" / "rank-0.json").is_file()


def test_rng_state_round_trips_through_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    ckpt.write_json(tmp_path / "rng.json", ckpt.rng_state())
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng_file(tmp_path / "rng.json")
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_malformed_state_files_name_the_file(saved, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(saved, copy)
    (copy / "rng" / "rank-0.json").write_text('{"python": [3, [1, 2], null]}')
    with pytest.raises(CheckpointError, match=r"rank-0.json: not a valid RNG state"):
        ckpt.load_rng_file(copy / "rng" / "rank-0.json")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    (copy / "scheduler.json").write_text('{"last_epoch": "soon"}')
    with pytest.raises(CheckpointError, match=r"scheduler.json: expected the keys"):
        ckpt.load_scheduler_file(copy / "scheduler.json", scheduler)
    (copy / "optimizer.json").write_text('{"state": {"no.such.weight": {"exp_avg": null}}, "param_groups": []}')
    with pytest.raises(CheckpointError, match=r"optimizer.json: does not match optimizer.safetensors"):
        ckpt.load_optimizer_files(copy, optimizer)
