"""SFT loop in one process: resume equality, gradient accumulation, adapter parity with
peft + transformers, merged checkpoint, bad data. Tiny shapes; every run takes a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.recipe import SFTRecipe, load_recipe
from align.train.checkpointing import list_checkpoints
from align.train.metrics import read_metrics
from align.train.order import DataOrder
from align.train.sft import local_micro_batches, run_sft

BASE = [
    "model.preset=tiny", "model.config.num_hidden_layers=2", "data.synthetic.train=96", "data.synthetic.test=16",
    "data.max_length=32", "data.packing=false", "train.steps=4", "train.micro_batch_size=8", "train.bf16=false",
    "optim.lr=3e-3", "output.progress=false", "eval.batch_size=16", "train.deterministic=true",
]


def recipe(run_dir: Path, *overrides: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, None, [*BASE, f"output.run_dir={run_dir}", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_data_order_is_a_function_of_seed_and_step():
    order = DataOrder(10, seed=3, rows_per_step=4)
    seen = order.step_rows(0) + order.step_rows(1) + order.step_rows(2)[:2]
    assert sorted(seen) == list(range(10))  # one epoch covers every row once
    assert DataOrder(10, 3, 4).step_rows(5) == order.step_rows(5)
    assert DataOrder(10, 4, 4).step_rows(0) != order.step_rows(0)
    assert local_micro_batches(list(range(8)), rank=1, world=2, micro=2) == [[2, 3], [6, 7]]


def test_full_finetune_resume_continues_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(recipe(a, "train.steps=6", "train.save_every=3", "data.packing=true", "data.max_length=64"))
    assert [p.name for p in list_checkpoints(a)] == ["step-000003", "step-000006"]
    resumed = recipe(b, "train.steps=6", "data.packing=true", "data.max_length=64",
                     f"resume_from={a / 'checkpoints' / 'step-000003'}")
    run_sft(resumed)
    first, second = losses(a), losses(b)
    assert sorted(second) == [4, 5, 6]
    for step in (4, 5, 6):  # same process, same ops: equal to float32 rounding
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7), step


def test_lora_resume_with_dropout_and_accumulation(tmp_path):
    """LoRA dropout draws from the RNG, so this also checks the restored RNG streams."""
    lora = ["lora.r=4", "lora.targets=[q_proj, kv_b_proj, o_proj]", "lora.dropout=0.2", "train.grad_accum=2",
            "train.micro_batch_size=4", "optim.lr=1e-2"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(recipe(a, *lora, "train.steps=6", "train.save_every=3"))
    run_sft(recipe(b, *lora, "train.steps=6", "resume_from=latest"))  # nothing to resume: a fresh run
    assert losses(b) == pytest.approx(losses(a), rel=1e-6)
    c = tmp_path / "c"
    run_sft(recipe(c, *lora, "train.steps=6", f"resume_from={a / 'checkpoints' / 'step-000003'}"))
    for step in (4, 5, 6):
        assert losses(c)[step] == pytest.approx(losses(a)[step], rel=1e-6), step
    assert (a / "checkpoints" / "step-000006" / "adapter" / "adapter_config.json").is_file()


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    """The loss is the mean over every trained token of the global batch, however it is split."""
    run_sft(recipe(tmp_path / "big", "train.micro_batch_size=16", "train.grad_accum=1", "output.merge=false"))
    run_sft(recipe(tmp_path / "acc", "train.micro_batch_size=4", "train.grad_accum=4", "output.merge=false"))
    big, acc = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert acc == pytest.approx(big, rel=2e-5)


def test_adapter_loads_into_peft_and_transformers(tmp_path):
    """The saved adapter (routed experts included) on transformers' own DeepseekV2 gives our logits;
    the merged final checkpoint gives them too."""
    import transformers
    from peft import PeftModel

    from align.models import DeepseekV2ForCausalLM

    run = tmp_path / "lora"
    metrics = run_sft(recipe(run, "lora.r=4", "lora.routed_experts=true", "optim.lr=2e-2", "train.steps=3",
                             "eval.exact_match=true", "eval.max_new_tokens=4"))
    assert 0.0 <= metrics["eval/exact_match"] <= 1.0 and metrics["eval/loss"] > 0
    adapter = run / "checkpoints" / "step-000003" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (run / "base").resolve()
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    ours = PeftModel.from_pretrained(DeepseekV2ForCausalLM.from_pretrained(run / "base"), adapter).eval()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    assert type(hf_base).__module__.startswith("transformers.models.deepseek_v2")
    theirs = PeftModel.from_pretrained(hf_base, adapter).eval()
    merged = DeepseekV2ForCausalLM.from_pretrained(run / "final").eval()
    base = DeepseekV2ForCausalLM.from_pretrained(run / "base").eval()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
        assert (base(input_ids=ids).logits - logits).abs().max() > 1e-3  # the adapter did change something
    assert (run / "final" / "tokenizer.json").is_file()


def test_bad_data_row_fails_naming_the_row_and_leaves_no_checkpoint(tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}
    rows.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"rows.jsonl: row 2: message 0 has no 'content' field"):
        run_sft(recipe(run, "data.synthetic=null", f"data.train={rows}"))
    assert not (run / "checkpoints").exists() and not (run / "final").exists()
    skipped = recipe(tmp_path / "skip", "data.synthetic=null", f"data.train={rows}", "data.on_error=skip",
                     "train.steps=null", "train.epochs=1", "train.micro_batch_size=2")
    run_sft(skipped)
    assert [p.name for p in list_checkpoints(tmp_path / "skip")] == ["step-000001"]  # 2 good rows = 1 step
    rows.write_text(rows.read_text() + "{truncated\n")  # and a line that is not JSON
    with pytest.raises(ValueError, match=r"rows.jsonl: invalid JSON at line 4"):
        run_sft(recipe(tmp_path / "line", "data.synthetic=null", f"data.train={rows}"))
    run_sft(recipe(tmp_path / "line", "data.synthetic=null", f"data.train={rows}", "data.on_error=skip",
                   "train.steps=null", "train.epochs=1", "train.micro_batch_size=2"))
    assert [p.name for p in list_checkpoints(tmp_path / "line")] == ["step-000001"]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    lora = ["lora.r=4", "train.steps=3", "output.merge=false"]
    run_sft(recipe(tmp_path / "plain", *lora))
    for mode in ("true", "selective"):
        run_sft(recipe(tmp_path / mode, *lora, f"train.gradient_checkpointing={mode}"))
        assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "plain"), rel=1e-5), mode


def test_aux_loss_alpha_override(tmp_path):
    from align.models import build_model
    from align.train.setup import set_aux_loss_alpha

    model = build_model("tiny", num_hidden_layers=2).train()
    ids = torch.randint(3, 1000, (2, 8))
    default = model(input_ids=ids).aux_loss
    set_aux_loss_alpha(model, 0.01)
    assert model(input_ids=ids).aux_loss.item() == pytest.approx(default.item() * 10, rel=1e-5)
    assert model.config.aux_loss_alpha == 0.01
    set_aux_loss_alpha(model, 0.0)
    assert model(input_ids=ids).aux_loss is None
    run_sft(recipe(tmp_path / "noaux", "train.aux_loss_alpha=0", "train.steps=1", "output.merge=false"))
    assert [r["train/aux_loss"] for r in read_metrics(tmp_path / "noaux") if "train/aux_loss" in r] == [0.0]


def test_missing_tracker_is_a_clear_error(tmp_path):
    from accelerate.tracking import get_available_trackers

    if "tensorboard" in {str(t) for t in get_available_trackers()}:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ValueError, match=r"'tensorboard' is not installed \(pip install tensorboard\)"):
        run_sft(recipe(tmp_path / "tb", "output.trackers=[tensorboard]"))
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        run_sft(recipe(tmp_path / "tb", "output.trackers=[tensorbored]"))


def test_greedy_loop_and_generation_engine_agree():
    from align.models import build_model
    from align.train.evaluate import generate

    model = build_model("tiny", num_hidden_layers=2, seed=1).eval()
    prompts = [[0, 5, 9, 13], [0, 7], [0, 3, 3, 3, 3, 8, 21]]  # ragged: left padding in the loop
    loop = generate(model, prompts, max_new_tokens=5, eos_id=1, pad_id=2)
    engine = generate(model, prompts, max_new_tokens=5, eos_id=1, pad_id=2, engine=True)
    assert loop == engine and all(len(c) == 5 for c in loop)
