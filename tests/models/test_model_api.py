"""The model's public surface: logits_to_keep, hidden states without logits, MoE layout, PEFT."""

from __future__ import annotations

import peft
import torch

from align.models import DeepseekV2ForCausalLM, build_model, preset_config


def test_logits_to_keep_and_hidden_only():
    model = build_model("tiny", seed=1).eval()
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([2, 5])).logits
        hidden = model(ids, return_logits=False)
    assert last.shape == (2, 1, 1024) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
    assert torch.allclose(picked, full[:, [2, 5]], atol=1e-6)
    assert hidden.logits is None and hidden.last_hidden_state.shape == (2, 9, 128)
    assert torch.allclose(model.lm_head(hidden.last_hidden_state), full, atol=1e-6)


def test_moe_layer_layout():
    config = preset_config("tiny", num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    assert [layer.is_moe for layer in model.model.layers] == [False, False, True, False, True, False]


def test_peft_lora_wraps_and_trains():
    model = build_model("tiny", seed=2)
    targets = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ids = torch.randint(0, 1024, (2, 12))
    lora(ids, labels=ids).loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    assert not any("experts.gate_up_proj" in n for n in trained)


def test_fused_loss_equals_logits_loss():
    model = build_model("tiny", seed=3).eval()
    ids = torch.randint(0, 1024, (2, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    ref = model(ids, labels=labels)
    ref.loss.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    fused = model(ids, labels=labels, return_logits=False)
    fused.loss.backward()
    assert fused.logits is None
    assert torch.allclose(fused.loss, ref.loss, rtol=1e-5)
    assert torch.allclose(model.lm_head.weight.grad, grad, rtol=1e-4, atol=1e-7)
