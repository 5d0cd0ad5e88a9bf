"""The run floor: loops stand on it and not on each other; one Setup per mode answers what differs."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from align.recipe import SFTRecipe, load_recipe
from align.train.run import Cadence, load_tokenizer_for
from align.train.setup import FullSetup, LoRASetup, setup_model

TRAIN = Path(__file__).resolve().parents[2] / "align" / "train"
LOOPS = {"sft", "grpo", "rm"}
FLOOR = ("run", "setup", "order")

BASE = ["model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=8", "train.steps=2",
        "train.bf16=false", "output.progress=false", "optim.lr=1e-2"]


def train_imports(name: str) -> set[str]:
    """The align.train modules that align/train/<name>.py imports."""
    found = set()
    for node in ast.walk(ast.parse((TRAIN / f"{name}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "align.train":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("align.train."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("align.train.")}
    return found


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_loops_stand_on_the_floor_not_on_each_other(loop):
    imported = train_imports(loop)
    assert {"run", "setup", "order"} <= imported and not imported & (LOOPS - {loop})


@pytest.mark.parametrize("floor", FLOOR)
def test_the_floor_imports_no_loop(floor):
    assert not train_imports(floor) & LOOPS


def test_cadence_logs_and_saves_the_last_step():
    train = SimpleNamespace(log_every=2, eval_every=2, save_every=3)
    cadence = Cadence(train, steps=5)
    assert [d for d in range(1, 6) if cadence.log(d)] == [2, 4, 5]
    assert [d for d in range(1, 6) if cadence.eval(d)] == [2, 4]
    assert [d for d in range(1, 6) if cadence.save(d)] == [3, 5]
    never = Cadence(SimpleNamespace(log_every=1, eval_every=0, save_every=0), steps=3)
    assert [d for d in range(1, 4) if never.eval(d)] == [] and [d for d in range(1, 4) if never.save(d)] == [3]


def make_setup(tmp_path: Path, *overrides: str):
    recipe = load_recipe(SFTRecipe, None, [*BASE, f"output.run_dir={tmp_path / 'run'}", *overrides])
    tokenizer = load_tokenizer_for(recipe)
    setup = setup_model(recipe, tokenizer, Accelerator(cpu=True), 2, 8, lambda _: None, None)
    return setup, recipe, tokenizer


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_once(setup) -> None:
    ids = torch.arange(3, 19).reshape(2, 8)
    with setup.grad_sync(True):
        setup.model(input_ids=ids, labels=ids).loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad()


@pytest.mark.parametrize(("overrides", "kind", "mode", "weights"), [
    (["lora=null"], FullSetup, "full", "model"),
    (["lora.r=4"], LoRASetup, "lora", "adapter"),
])
def test_setup_answers_for_its_mode(tmp_path, overrides, kind, mode, weights):
    setup, recipe, tokenizer = make_setup(tmp_path, *overrides)
    assert type(setup) is kind and setup.mode == mode
    assert setup.distribution == "single" and setup.unwrapped is setup.model
    ids = torch.arange(3, 11).reshape(1, 8)
    start = logits(setup.model, ids)
    setup.keep_reference(recipe)
    train_once(setup)
    assert not torch.allclose(logits(setup.model, ids), start)
    with setup.reference() as ref:  # the starting weights, whatever the mode
        torch.testing.assert_close(logits(ref, ids), start)
        if kind is FullSetup:
            assert ref is not setup.model and not any(p.requires_grad for p in ref.parameters())
    setup.save(tmp_path / "ckpt", tokenizer)
    assert (tmp_path / "ckpt" / weights / "tokenizer_config.json").is_file()
    state, final = setup.final_state(), setup.final_model()
    assert (state is None) == (kind is LoRASetup)
    assert not any("lora" in name for name in (state or final.state_dict()))


def test_lora_refuses_fsdp_and_auto_picks_per_mode():
    two = SimpleNamespace(num_processes=2)
    assert LoRASetup.distribution_for("auto", two) == "ddp" and FullSetup.distribution_for("auto", two) == "fsdp"
    assert FullSetup.distribution_for("ddp", two) == "ddp"
    assert LoRASetup.distribution_for("fsdp", SimpleNamespace(num_processes=1)) == "single"
    with pytest.raises(ValueError, match="train.distributed=fsdp is for full fine-tuning"):
        LoRASetup.distribution_for("fsdp", two)
