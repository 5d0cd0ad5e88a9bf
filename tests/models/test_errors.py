"""Bad configs and checkpoints fail with errors that name the file and the key."""

from __future__ import annotations

import json

import pytest
import torch

from align.models import CheckpointError, ConfigError, DeepseekV2ForCausalLM, build_model, preset_config


@pytest.fixture
def checkpoint(tmp_path):
    model = build_model("tiny", num_hidden_layers=2)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="400KB")
    return tmp_path / "ckpt"


def edit_config(path, **changes):
    file = path / "config.json"
    raw = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    file.write_text(json.dumps(raw))


def test_roundtrip_is_sharded_and_exact(checkpoint):
    assert (checkpoint / "model.safetensors.index.json").is_file()
    model = build_model("tiny", num_hidden_layers=2)
    loaded = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not list(checkpoint.parent.glob(".ckpt*")), "temporary directory left behind"


def test_dtype_argument(checkpoint):
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unsupported_model_type(checkpoint):
    edit_config(checkpoint, model_type="llama")
    with pytest.raises(ConfigError, match=r"config\.json.*'model_type'.*'llama'.*deepseek_v2"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_missing_config_field(checkpoint):
    edit_config(checkpoint, kv_lora_rank=None)
    with pytest.raises(ConfigError, match=r"config\.json.*kv_lora_rank"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_invalid_topk_method(checkpoint):
    edit_config(checkpoint, topk_method="best")
    with pytest.raises(ConfigError, match=r"config\.json.*topk_method.*greedy"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_missing_shard(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_truncated_shard(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_wrong_shape(checkpoint):
    edit_config(checkpoint, kv_lora_rank=48)
    with pytest.raises(CheckpointError, match=r"safetensors: tensor 'model\.layers\.0\.self_attn\.kv_a.*' has shape"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_missing_tensor(checkpoint):
    index = checkpoint / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    edit_config(checkpoint, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.2"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    assert raw["weight_map"]


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path / "empty")


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'tinny'.*did you mean 'tiny'"):
        preset_config("tinny")


def test_presets_shapes():
    lite = preset_config("deepseek-v2-lite")
    shape = (lite.num_hidden_layers, lite.n_routed_experts, lite.kv_lora_rank, lite.q_lora_rank)
    assert shape == (27, 64, 512, None)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(lite)
    total = sum(p.numel() for p in model.parameters())
    assert 15.5e9 < total < 16.0e9
    v2 = preset_config("deepseek-v2")
    assert (v2.q_lora_rank, v2.n_group, v2.topk_group, v2.routed_scaling_factor) == (1536, 8, 3, 16.0)
