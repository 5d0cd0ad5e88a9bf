"""Drop-in: our DeepseekV2ForCausalLM inside TRL 1.16's own SFTTrainer and GRPOTrainer.

Nothing is fetched from a hub: the model object (``build_model("tiny")``) and the committed tiny
tokenizer (DeepSeek-V2 chat template) are passed in directly, datasets are built in memory, and
the full-parameter reference model of GRPO (beta > 0) is reloaded by TRL from a checkpoint we
write to ``tmp_path``. Both trainers patch the model with TRL's fused LM head
(``trl.trainer.utils.add_fused_lm_head``), which runs ``model.base_model(...)`` and reads
``.last_hidden_state``: that path, not the model's own ``forward(labels=...)``, is what trains here.
It scores only the LM loss: our MoE balance loss (``aux_loss``) is not added, as TRL adds an MoE
loss only through ``output_router_logits`` / ``router_logits``, which our model does not produce.
"""

from __future__ import annotations

import math

import datasets
import peft
import pytest
import torch
import trl

from align.models import DeepseekV2ForCausalLM, build_model
from data_tools.tokenizer import load_tokenizer
from rewards import build_rewards, trl_reward_funcs

CPU = {"report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", "seed": 0, "logging_steps": 1}
LORA_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# exact_match on the `answer` column; a length penalty in characters so that rewards vary inside
# every group even when no completion of the random model stops before max_completion_length
REWARD_SPECS = [
    "exact_match",
    {"name": "length_penalty", "weight": 0.5, "params": {"target": 0, "max_length": 100, "unit": "chars"}},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are too small to split: on a busy 2-core machine a second intra-op thread
    only spins (the file takes ~60 s instead of ~5 s while another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model() -> DeepseekV2ForCausalLM:
    return build_model("tiny", num_hidden_layers=2, seed=0)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_all_changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(params[n].detach(), p)]
    assert before and not unchanged, f"parameters not updated: {unchanged}"


def _step_logs(trainer) -> list[dict[str, float]]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, trainer.args.max_steps + 1))
    return logs


# ---------------------------------------------------------------------------------------------
# SFTTrainer
# ---------------------------------------------------------------------------------------------


def _chat(i: int) -> tuple[dict[str, str], dict[str, str]]:
    # varying lengths, so the collated batches carry padding
    user = {"role": "user", "content": f"What is {i} + {i * 7}?" + " Please answer." * (i % 3)}
    return user, {"role": "assistant", "content": f"The answer is {i * 8}."}


def _sft_config(tmp_path, **kwargs) -> trl.SFTConfig:
    return trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, **CPU, **kwargs
    )


def _train_sft(trainer: trl.SFTTrainer) -> None:
    before = _snapshot(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in _step_logs(trainer)]
    assert all(math.isfinite(v) and v > 0 for v in losses), losses
    _assert_all_changed(trainer.model, before)


def test_sft_trainer_conversational(tmp_path) -> None:
    model, tok = _tiny_model(), load_tokenizer("tiny")
    ds = datasets.Dataset.from_list([{"messages": list(_chat(i))} for i in range(4)])
    trainer = trl.SFTTrainer(model=model, args=_sft_config(tmp_path), train_dataset=ds, processing_class=tok)

    # TRL tokenized with our chat template and trains on every token (language-modeling dataset)
    row = trainer.train_dataset[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(list(_chat(0)), tokenize=False)
    # TRL's loss (fused LM head over our backbone, padded batch) equals our model's causal-LM loss
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert (batch["attention_mask"] == 0).any()
    model.eval()  # no MoE balance loss in ours: TRL's fused head does not add it (see the module docstring)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(trl_loss, ours.loss, rtol=1e-5, atol=1e-6)

    _train_sft(trainer)


def test_sft_trainer_completion_only(tmp_path) -> None:
    """Prompt-completion conversations: TRL masks the prompt, so only the assistant turn (with its EOS) is trained."""
    model, tok = _tiny_model(), load_tokenizer("tiny")
    rows = [{"prompt": [user], "completion": [reply]} for user, reply in map(_chat, range(4))]
    trainer = trl.SFTTrainer(
        model=model, args=_sft_config(tmp_path), train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    row = trainer.train_dataset[0]
    assert tok.decode([t for t in row["labels"] if t != -100]) == " The answer is 0." + tok.eos_token
    _train_sft(trainer)


def test_sft_trainer_assistant_only_loss(tmp_path) -> None:
    """`assistant_only_loss` needs `{% generation %}` markers; TRL patches only templates it knows."""
    ds = datasets.Dataset.from_list([{"messages": list(_chat(i))} for i in range(4)])
    args = _sft_config(tmp_path, assistant_only_loss=True)
    try:
        trainer = trl.SFTTrainer(model=_tiny_model(), args=args, train_dataset=ds, processing_class=load_tokenizer())
    except ValueError as err:  # trl/chat_template_utils.py: get_training_chat_template
        if "generation" not in str(err):
            raise
        pytest.skip(f"TRL {trl.__version__} cannot mask assistant turns with the DeepSeek-V2 template: {err}")
    _train_sft(trainer)


# ---------------------------------------------------------------------------------------------
# GRPOTrainer
# ---------------------------------------------------------------------------------------------


def _prompts() -> datasets.Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(4)]
    return datasets.Dataset.from_list(rows)


def _grpo(tmp_path, model, beta: float, **kwargs) -> tuple[trl.GRPOTrainer, list[float]]:
    funcs, weights = trl_reward_funcs(build_rewards(REWARD_SPECS))
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=1e-2, beta=beta, reward_weights=weights,
        per_device_train_batch_size=8, num_generations=4,  # 2 prompts × G = 4 per step: 4 prompts, 2 steps
        max_completion_length=8, use_vllm=False, **CPU,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=funcs, args=args, train_dataset=_prompts(), processing_class=load_tokenizer("tiny"),
        **kwargs,
    )  # fmt: skip
    return trainer, weights


def _train_grpo(trainer: trl.GRPOTrainer, weights: list[float]) -> list[dict[str, float]]:
    before = _snapshot(trainer.model)
    trainer.train()
    logs = _step_logs(trainer)
    for h in logs:
        assert all(math.isfinite(h[k]) for k in ("loss", "reward", "rewards/exact_match/mean")), h
        assert 0 < h["completions/mean_length"] <= 8
        # the trainer's reward is the weighted sum of our functions' scores
        parts = weights[0] * h["rewards/exact_match/mean"] + weights[1] * h["rewards/length_penalty/mean"]
        assert h["reward"] == pytest.approx(parts, abs=1e-6)
        assert h["rewards/length_penalty/mean"] < 0 and h["reward_std"] > 0
    _assert_all_changed(trainer.model, before)
    return logs


def test_grpo_trainer_beta0(tmp_path) -> None:
    trainer, weights = _grpo(tmp_path, _tiny_model(), beta=0.0)
    assert trainer.ref_model is None
    logs = _train_grpo(trainer, weights)
    assert "kl" not in logs[0]


def test_grpo_trainer_beta_full_reference(tmp_path) -> None:
    """beta > 0 with a full model object: TRL builds the reference with create_model_from_path(
    config._name_or_path) (grpo_trainer.py, "# Reference model"), i.e. transformers' own class named in
    config.json's `architectures`. So the policy is loaded with our from_pretrained (which records the path)
    from a checkpoint written by our save_pretrained (which records the architecture)."""
    _tiny_model().save_pretrained(tmp_path / "ckpt")
    model = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ckpt")
    trainer, weights = _grpo(tmp_path, model, beta=0.1)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    logs = _train_grpo(trainer, weights)
    # step 1: policy == reference, so the reference (loaded from our checkpoint) scores our rollouts as we do
    assert logs[0]["kl"] < 1e-6 and logs[1]["kl"] > 0
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())


def test_grpo_trainer_beta_lora(tmp_path) -> None:
    """beta > 0 with a PEFT model: the reference is the same model with the adapters disabled (no copy)."""
    model = _tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    trainer, weights = _grpo(tmp_path, model, beta=0.1, peft_config=lora)
    assert trainer.ref_model is None
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    logs = _train_grpo(trainer, weights)
    assert logs[0]["kl"] == 0 and logs[1]["kl"] > 0  # LoRA B starts at zero: policy == reference at step 1
    frozen = {n.replace(".base_layer", ""): p for n, p in trainer.model.get_base_model().named_parameters()}
    assert all(torch.equal(frozen[n], p) for n, p in base.items())
