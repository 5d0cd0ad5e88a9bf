"""Recipes: YAML -> typed dataclasses, overrides, error messages; optimizer schedules; LoRA targets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.recipe import RecipeError, RLRecipe, RMRecipe, SFTRecipe, dump_recipe, load_recipe, read_yaml, to_dict
from align.train.lora import lora_config
from align.train.optim import build_optimizer, build_scheduler

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = RECIPES / "tiny_sft.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {preset: tiny}\ndata: {train: rows.jsonl}\ntrain: {steps: 3}\n"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_opens_with_its_launch_command(path):
    first = path.read_text().splitlines()[0]
    kind = next((k for k in ("rl", "rm") if f"{k} recipes/{path.name}" in first), "sft")
    assert first.startswith("# ") and (f"align {kind} recipes/{path.name}" in first
                                       or f"align.cli {kind} recipes/{path.name}" in first), first
    schema = {"rl": RLRecipe, "rm": RMRecipe, "sft": SFTRecipe}[kind]
    raw = read_yaml(path)
    rewards = [r for r in raw.get("rewards", []) if isinstance(r, dict)]
    models = [r["params"]["model"] for r in rewards if r["name"] == "reward_model"]
    if any(not Path(m, "config.json").is_file() for m in models):  # a reward model an earlier command writes
        with pytest.raises(RecipeError, match="reward_model.*not a local model directory"):
            load_recipe(schema, path)
        return
    assert isinstance(load_recipe(schema, path), schema)


def test_tiny_recipe_values():
    recipe = load_recipe(SFTRecipe, TINY)
    assert recipe.model.preset == "tiny" and recipe.lora is None
    assert recipe.data.synthetic is not None and recipe.eval.exact_match
    assert recipe.output.run_dir == "runs/tiny_sft"
    assert isinstance(recipe.optim.lr, float)


def test_overrides_are_parsed_by_field_type(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(SFTRecipe, path, [
        "train.steps=7", "optim.lr=1e-4", "train.bf16=false", "optim.betas=0.8,0.9",
        "train.max_grad_norm=null", "data.train_on=all", "output.run_dir=123", "model.config.num_hidden_layers=2",
        "lora.r=4", "schedule.step_at=[0.5, 0.75]",
    ])
    assert recipe.train.steps == 7 and recipe.optim.lr == 1e-4 and recipe.train.bf16 is False
    assert recipe.optim.betas == [0.8, 0.9] and recipe.train.max_grad_norm is None
    assert recipe.data.train_on == "all" and recipe.output.run_dir == "123"
    assert recipe.model.config == {"num_hidden_layers": 2}
    assert recipe.lora is not None and recipe.lora.r == 4 and recipe.lora.alpha == 32.0  # defaults filled
    assert recipe.schedule.step_at == [0.5, 0.75]
    assert load_recipe(SFTRecipe, path, ["lora.r=4", "lora=null"]).lora is None


def test_yaml_float_written_without_dot_is_accepted(tmp_path):
    recipe = load_recipe(SFTRecipe, write(tmp_path, MINIMAL + "optim: {lr: 1e-4}\n"))
    assert recipe.optim.lr == 1e-4


def test_unknown_yaml_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps: 3", "stepz: 3"))
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, path)
    message = str(err.value)
    assert str(path) in message and "'train.stepz'" in message and "did you mean 'train.steps'" in message


def test_misplaced_key_points_to_its_section(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'train.lr'; did you mean 'optim.lr'"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["train.lr=0.1"])


def test_unknown_override_key(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'optim.weight_decy'; did you mean 'optim.weight_decay'"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["optim.weight_decy=0"])


@pytest.mark.parametrize("override, expected", [
    ("train.micro_batch_size=abc", r"key 'train.micro_batch_size' expects int or one of 'auto', got 'abc'"),
    ("train.steps=1.5", r"key 'train.steps' expects int or null, got 1.5"),
    ("train.bf16=maybe", r"key 'train.bf16' expects bool, got 'maybe'"),
    ("data.truncation=left", r"key 'data.truncation' expects one of 'right', 'drop', got 'left'"),
    ("optim.betas=[a, b]", r"key 'optim.betas\[0\]' expects float, got 'a'"),
    ("data.train_on=assistent", r"did you mean 'assistant'"),
])
def test_wrong_types_name_key_expected_and_got(tmp_path, override, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1e-3", r"'optim.lr' must be > 0, got -0.001"),
    ("optim.lr=0", r"'optim.lr' must be > 0, got 0.0"),
    ("optim.weight_decay=-0.1", r"'optim.weight_decay' must be >= 0, got -0.1"),
    ("optim.betas=[0.9, 1.0]", r"'optim.betas\[1\]' must be in \[0, 1\), got 1.0"),
    ("optim.eps=0", r"'optim.eps' must be > 0"),
    ("train.max_grad_norm=-1", r"'train.max_grad_norm' must be > 0, got -1.0"),
    ("schedule.warmup_steps=-5", r"'schedule.warmup_steps' must be >= 0, got -5"),
    ("schedule.min_lr_ratio=1.5", r"'schedule.min_lr_ratio' must be in \[0, 1\]"),
    ("schedule.step_at=[0.5, 2]", r"'schedule.step_at\[1\]' must be in \[0, 1\]"),
    ("train.seed=-1", r"'train.seed' must be in \[0, 4294967295\], got -1"),
    ("train.steps=0", r"'train.steps' must be >= 1, got 0"),
    ("train.save_every=-1", r"'train.save_every' must be >= 0"),
    ("train.max_nonfinite_steps=-1", r"'train.max_nonfinite_steps' must be >= 0"),
    ("train.aux_loss_alpha=-0.01", r"'train.aux_loss_alpha' must be >= 0"),
    ("lora.dropout=1", r"'lora.dropout' must be in \[0, 1\)"),
    ("data.max_length=1", r"'data.max_length' must be >= 2, got 1"),
    ("eval.batch_size=0", r"'eval.batch_size' must be >= 1"),
])
def test_numeric_keys_out_of_range_name_key_and_range(tmp_path, override, expected):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=rf"{path}: {expected}"):
        load_recipe(SFTRecipe, path, [override])


@pytest.mark.parametrize("override, expected", [
    ("grpo.num_generations=1", r"'grpo.num_generations' must be >= 2, got 1"),
    ("grpo.temperature=0", r"'grpo.temperature' must be > 0"),
    ("grpo.top_p=0", r"'grpo.top_p' must be in \(0, 1\]"),
    ("grpo.beta=-0.1", r"'grpo.beta' must be >= 0"),
    ("grpo.delta=0.5", r"'grpo.delta' must be > 1"),
    ("grpo.max_failed_reward_steps=0", r"'grpo.max_failed_reward_steps' must be >= 1"),
    ("train.max_grad_norm=-1", r"'train.max_grad_norm' must be > 0"),
    ("optim.lr=-1", r"'optim.lr' must be > 0"),
])
def test_rl_numeric_keys_out_of_range(override, expected):
    base = ["model.preset=tiny", "data.synthetic.train=8", "rewards=[exact_match]"]
    with pytest.raises(RecipeError, match=expected):
        load_recipe(RLRecipe, None, [*base, override])


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_floats_are_rejected(tmp_path, value):
    with pytest.raises(RecipeError, match=r"key 'optim.lr' must be a finite number"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), [f"optim.lr={value}"])
    with pytest.raises(RecipeError, match=r"key 'optim.lr' must be a finite number"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL + f"optim: {{lr: {value}}}\n"))


def _numeric_fields(cls: type, prefix: str = ""):
    """(dotted key, field) for every int / float (optional or list) field of a recipe tree."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            yield from _numeric_fields(inner, f"{prefix}{f.name}.")
        elif inner in (int, float) or typing.get_args(inner) in ((int,), (float,)):
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("schema", [SFTRecipe, RLRecipe])
def test_every_numeric_key_declares_its_valid_range(schema):
    fields = list(_numeric_fields(schema))
    assert len(fields) > 30
    missing = [key for key, f in fields if "range" not in f.metadata]
    assert not missing, f"numeric recipe keys without a Range (use ranged()): {missing}"


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path, MINIMAL + "optim: {lr: fast}\n")
    with pytest.raises(RecipeError, match=rf"{path}: key 'optim.lr' expects float, got 'fast'"):
        load_recipe(SFTRecipe, path)


def test_cross_field_rules(tmp_path):
    with pytest.raises(RecipeError, match="exactly one of 'model.preset' or 'model.path'"):
        load_recipe(SFTRecipe, write(tmp_path, "data: {train: x}\ntrain: {steps: 1}\n"))
    with pytest.raises(RecipeError, match="exactly one of 'train.steps' or 'train.epochs'"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["train.epochs=1"])
    with pytest.raises(RecipeError, match="exactly one of 'data.train' or 'data.synthetic'"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["data.synthetic.train=10"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["train.steps"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(SFTRecipe, tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(SFTRecipe, write(tmp_path, "- a\n- b\n"))


def test_dump_round_trips(tmp_path):
    recipe = load_recipe(SFTRecipe, TINY, ["lora.r=4", "optim.lr=5e-4"])
    again = load_recipe(SFTRecipe, write(tmp_path, dump_recipe(recipe)))
    assert to_dict(again) == to_dict(recipe)
    assert read_yaml(tmp_path / "recipe.yaml")["lora"]["r"] == 4


# ------------------------------------------------------------------------------------ schedules


def lrs(name: str, total: int = 100, **kw) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, name, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_warmup_then_decay_to_floor():
    values = lrs("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 10 - 1) / 2
    assert lrs("cosine", warmup_steps=10)[math.ceil(mid)] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))


def test_step_schedule_is_deepseeks():
    values = lrs("step", warmup_steps=5)
    assert values[4] == pytest.approx(1.0) and values[79] == pytest.approx(1.0)
    assert values[80] == pytest.approx(0.316) and values[89] == pytest.approx(0.316)
    assert values[90] == pytest.approx(0.316**2) and values[-1] == pytest.approx(0.316**2)


def test_constant_schedule():
    values = lrs("constant", warmup_steps=4)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(values[4:]) == {1.0}


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.ndim for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


# ----------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def tiny_model():
    from align.models import build_model

    return build_model("tiny", num_hidden_layers=2)


def test_lora_default_targets(tiny_model):
    config = lora_config(tiny_model, r=4)
    assert set(config.target_modules) == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert set(config.target_parameters) == {
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight",
    }
    with_experts = lora_config(tiny_model, r=4, routed_experts=True)
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(with_experts.target_parameters)


def test_lora_query_compression_targets():
    from align.models import build_model

    model = build_model("tiny", num_hidden_layers=1, q_lora_rank=16)
    assert {"q_a_proj", "q_b_proj"} <= set(lora_config(model).target_modules)


def test_lora_bad_targets(tiny_model):
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no Linear module"):
        lora_config(tiny_model, targets=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="supports no dropout"):
        lora_config(tiny_model, dropout=0.1)
    assert lora_config(tiny_model, dropout=0.1, targets=["q_proj", "o_proj"]).lora_dropout == 0.1


@pytest.mark.parametrize("text, expected", [
    ("selective", "selective"), ("true", True), ("false", False), ("'true'", True), ("off", False),
])
def test_gradient_checkpointing_takes_true_false_selective(tmp_path, text, expected):
    path = write(tmp_path, MINIMAL.replace("train: {steps: 3}", f"train: {{steps: 3, gradient_checkpointing: {text}}}"))
    got = load_recipe(SFTRecipe, path).train.gradient_checkpointing
    assert got == expected and type(got) is type(expected)
    overridden = load_recipe(SFTRecipe, path, [f"train.gradient_checkpointing={text}"]).train.gradient_checkpointing
    assert overridden == expected


@pytest.mark.parametrize("key, value, valid", [
    ("gradient_checkpointing", "sometimes", "one of false, true, 'selective'"),
    ("gradient_checkpointing", "1.5", "one of false, true, 'selective'"),
    ("compile", "always", "one of 'auto', true, false"),
])
def test_layer_modes_reject_other_values_naming_key_and_valid(tmp_path, key, value, valid):
    with pytest.raises(RecipeError, match=rf"key 'train.{key}' expects {valid}, got"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), [f"train.{key}={value}"])
    for cls in (RLRecipe, RMRecipe):  # every loop reads the same key
        assert key in cls.__dataclass_fields__["train"].default_factory.__dataclass_fields__


def test_compile_defaults_to_auto_and_takes_bools(tmp_path):
    assert load_recipe(SFTRecipe, write(tmp_path, MINIMAL)).train.compile == "auto"
    assert load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["train.compile=true"]).train.compile is True
