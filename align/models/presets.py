"""Named model shapes for tests and benchmarks, built with random weights (never downloaded)."""

from __future__ import annotations

import difflib

import torch

from align.models.checkpoint import empty_model, resolve_device, resolve_dtype
from align.models.config import config_from_dict

_YARN_LITE = {
    "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "model_type": "deepseek_v2", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "topk_method": "greedy",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True,
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False,
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": _YARN_LITE,
        "bos_token_id": 100000, "eos_token_id": 100001, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
    "deepseek-v2": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 160, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "norm_topk_prob": False,
        "routed_scaling_factor": 16.0, "scoring_func": "softmax", "aux_loss_alpha": 0.003, "seq_aux": True,
        "max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": _YARN_LITE,
        "bos_token_id": 100000, "eos_token_id": 100001, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
}


def preset_config(name: str, **overrides):
    """transformers config for a named shape; keyword overrides replace config keys."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model preset {name!r}{hint}; valid: {', '.join(PRESETS)}")
    return config_from_dict({**PRESETS[name], **overrides}, source=f"preset '{name}'")


def build_model(name: str, dtype=None, device_map=None, seed: int = 0, **overrides):
    """A randomly initialised DeepseekV2ForCausalLM of a named shape, allocated once on the device."""
    from align.models.model import DeepseekV2ForCausalLM

    config = preset_config(name, **overrides)
    model = empty_model(DeepseekV2ForCausalLM, config, resolve_dtype(dtype, config), resolve_device(device_map))
    with torch.random.fork_rng(devices=[]):
        model.reset_parameters(seed)
    return model
