"""Run directories: a fresh run never mixes with an earlier one, resume_from=latest only continues a
checkpoint of the same recipe, and recipe.yaml is written only once the run has passed its checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.cli import main
from align.recipe import SFTRecipe, load_recipe
from align.train import checkpointing as ckpt
from align.train.metrics import read_metrics
from align.train.rundir import recipe_changes, rerun_command
from align.train.sft import run_sft

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=1", "data.synthetic.train=64", "data.synthetic.test=8",
    "data.max_length=32", "data.packing=false", "train.micro_batch_size=8", "train.bf16=false", "optim.lr=3e-3",
    "output.progress=false", "output.merge=false", "eval.batch_size=8", "train.save_every=2",
]


def recipe(run_dir: Path, *overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, [*BASE, f"output.run_dir={run_dir}", *overrides])


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.fixture
def earlier(tmp_path) -> Path:
    """A finished 4-step run."""
    run = tmp_path / "run"
    run_sft(recipe(run, "train.steps=4"))
    return run


def test_a_fresh_run_into_an_earlier_run_is_an_error_saying_what_to_do(earlier, capsys):
    before = (earlier / "recipe.yaml").read_text()
    code = main(["sft", "tiny_sft", *BASE, "train.steps=2", f"output.run_dir={earlier}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"output.run_dir '{earlier}' already holds a run" in err and "newest checkpoint: step-000004" in err
    assert "Add output.overwrite=true to delete it and start over, or resume_from=latest to continue it" in err
    assert (earlier / "recipe.yaml").read_text() == before
    assert [p.name for p in ckpt.list_checkpoints(earlier)] == ["step-000002", "step-000004"]


def test_overwrite_deletes_the_earlier_run(earlier):
    run_sft(recipe(earlier, "train.steps=2", "output.overwrite=true"))
    assert [p.name for p in ckpt.list_checkpoints(earlier)] == ["step-000002"]
    assert steps_logged(earlier) == [1, 2]


def test_latest_continues_only_a_checkpoint_of_the_same_recipe(earlier):
    # the failure guarded against: a shorter recipe resumed the earlier run's last step, trained nothing, exited 0
    with pytest.raises(ValueError, match=r"checkpoint is at step 4, beyond this recipe's 2 steps; set train.steps"):
        run_sft(recipe(earlier, "train.steps=2", "resume_from=latest"))
    with pytest.raises(ValueError, match=r"trained with another recipe .*data.synthetic.train: 64 -> 80; "
                                         r"model.config.num_hidden_layers: 1 -> 2"):
        run_sft(recipe(earlier, "train.steps=6", "resume_from=latest", "data.synthetic.train=80",
                       "model.config.num_hidden_layers=2"))
    with pytest.raises(ValueError, match=r"optim.lr: 0.003 -> 0.001"):
        run_sft(recipe(earlier, "train.steps=6", "resume_from=latest", "optim.lr=1e-3"))
    assert steps_logged(earlier) == [1, 2, 3, 4]  # the failed attempts changed nothing
    run_sft(recipe(earlier, "train.steps=6", "resume_from=latest", "eval.batch_size=4"))  # more steps: continue
    assert steps_logged(earlier) == [1, 2, 3, 4, 5, 6]
    assert load_recipe(SFTRecipe, earlier / "recipe.yaml").eval.batch_size == 4


def test_recipe_yaml_is_written_only_after_the_checks(earlier):
    before = (earlier / "recipe.yaml").read_text()
    late = recipe(earlier, "train.steps=6", "resume_from=latest", "train.micro_batch_size=4")  # fails in setup
    with pytest.raises(ValueError, match="rows per step"):
        run_sft(late)
    assert (earlier / "recipe.yaml").read_text() == before


def test_a_fresh_run_that_fails_in_setup_leaves_no_directory(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="no 'content' field"):
        run_sft(recipe(tmp_path / "run", "data.synthetic=null", f"data.train={rows}", "train.steps=1"))
    assert not (tmp_path / "run").exists()


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(notes.txt\) and does not hold an align run"):
        run_sft(recipe(tmp_path, "train.steps=1", "output.overwrite=true"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_latest_restarts_an_attempt_that_saved_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_sft(recipe(run, "train.steps=1", "train.save_every=0"))
    for step in ckpt.list_checkpoints(run):  # as if stopped before its first checkpoint
        step.rename(step.with_name("gone"))
    run_sft(recipe(run, "train.steps=1", "train.save_every=0", "resume_from=latest"))
    assert steps_logged(run) == [1] and not (run / ckpt.CHECKPOINTS / "gone").exists()


def test_recipe_changes_sort_blocking_from_other_keys():
    old = recipe(Path("a"), "train.steps=4", "lora.r=4")
    new = recipe(Path("b"), "train.steps=8", "lora.r=8", "lora.dropout=0.1", "eval.batch_size=4")
    blocking, other = recipe_changes(old, new)
    assert blocking == ["lora.r: 4 -> 8"]
    assert other == ["eval.batch_size: 8 -> 4", "lora.dropout: 0.0 -> 0.1", "train.steps: 4 -> 8"]
    assert recipe_changes(old, recipe(Path("c"), "train.steps=4"))[0] == ["lora: {'r': 4, 'alpha': 32.0, "
                                                                          "'dropout': 0.0, 'targets': None, "
                                                                          "'routed_experts': False} -> None"]


def test_rerun_command_after_an_interrupt(earlier, tmp_path):
    command = ["align", "sft", "r.yaml", f"output.run_dir={earlier}", "resume_from=x"]
    assert rerun_command(command, earlier).endswith(f"align sft r.yaml output.run_dir={earlier} resume_from=latest")
    assert rerun_command(["align", "sft", "r.yaml"], tmp_path / "none").endswith("\n  align sft r.yaml")


def test_a_relative_path_equals_its_resolved_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [o for o in BASE if not o.startswith("model.")]
    base += ["model.preset=null", "train.steps=4", f"output.run_dir={tmp_path / 'run'}"]
    old = load_recipe(SFTRecipe, None, [*base, f"model.path={tmp_path / 'base'}"])
    new = load_recipe(SFTRecipe, None, [*base, "model.path=base"])
    assert recipe_changes(old, new) == ([], [])
    other = load_recipe(SFTRecipe, None, [*base, "model.path=other"])
    assert recipe_changes(old, other)[0]
