"""Same weights, same inputs: our model against transformers' own DeepSeek-V2 / V3 (float32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.models import DeepseekV2ForCausalLM

from .cases import CASES, reference_model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def hub_style_config(path) -> None:
    """Rewrite a transformers-saved config.json the way real hub directories spell it."""
    file = path / "config.json"
    raw = json.loads(file.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        params["type"] = params.pop("rope_type")
        raw["rope_scaling"] = params
    raw["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}
    raw.update(aux_loss_alpha=0.001, seq_aux=True)
    file.write_text(json.dumps(raw))


def inputs(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 40), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_grads_match_transformers(case, tmp_path):
    ref = reference_model(case)
    shard = "60KB" if case in ("v2_group", "v3_noaux") else "1GB"
    ref.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    if case == "v2_lite":
        hub_style_config(tmp_path / "hf")
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf")
    ids, labels = inputs(ref.config.vocab_size)

    out_ref, out = ref(ids, labels=labels), ours(ids, labels=labels)
    assert rel_err(out.logits, out_ref.logits) <= 1e-4
    assert torch.allclose(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)

    out_ref.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, param in ours.named_parameters():
        assert name in ref_grads, name
        assert rel_err(param.grad, ref_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("case", ["v2_lite", "v3_noaux"])
def test_our_save_loads_into_transformers(case, tmp_path):
    ref = reference_model(case)
    ref.save_pretrained(tmp_path / "hf")
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="50KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids, _ = inputs(ref.config.vocab_size, seed=3)
    with torch.no_grad():
        assert rel_err(back(ids).logits, ref(ids).logits) <= 1e-6


def test_padding_mask_matches_transformers(tmp_path):
    ref = reference_model("v2_lite")
    ref.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids, _ = inputs(ref.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert rel_err(a[mask.bool()], b[mask.bool()]) <= 1e-4


@pytest.mark.parametrize("case", ["v2_group", "v3_noaux"])
def test_generate_with_cache_matches_transformers(case, tmp_path):
    """GenerationMixin.generate on our model (latent cache, left padding) = transformers' generate."""
    ref = reference_model(case)
    ref.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids, _ = inputs(ref.config.vocab_size, seed=5)
    ids = ids[:, :12]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    settings = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **settings), ref.generate(ids, **settings))
