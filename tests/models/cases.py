"""Tiny configurations covering every architecture switch the model core supports."""

from __future__ import annotations

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

YARN = {
    "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
}
BASE = {
    "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 24,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12, "n_routed_experts": 8,
    "n_shared_experts": 2, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
    "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False,
}

CASES = {
    # V2-Lite-like: no query compression, greedy softmax routing, YaRN.
    "v2_lite": ("v2", {**BASE, "q_lora_rank": None, "topk_method": "greedy", "rope_scaling": YARN}),
    # V2-like: query compression, device-limited routing, YaRN, large routed scale.
    "v2_group": ("v2", {
        **BASE, "q_lora_rank": 20, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 16.0, "rope_scaling": YARN,
    }),
    # Normalised top-k weights times a routed scale != 1 (transformers' V2 ignores norm_topk_prob,
    # so the reference for this switch is its V3 class, without groups and without rope interleave).
    "norm_topk_scaled": ("v3", {
        **BASE, "q_lora_rank": None, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "n_group": 1, "topk_group": 1, "rope_interleave": False, "num_nextn_predict_layers": 0,
    }),
    # Several dense layers before the MoE ones.
    "dense_first": ("v2", {**BASE, "num_hidden_layers": 4, "first_k_dense_replace": 2, "q_lora_rank": None}),
    # V3-like: sigmoid scores, e_score_correction_bias, noaux_tc group routing, q compression, YaRN.
    "v3_noaux": ("v3", {
        **BASE, "q_lora_rank": 20, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rope_scaling": YARN, "num_nextn_predict_layers": 0,
    }),
}


def reference_model(case: str, seed: int = 0):
    """transformers' own model for a case, float32, eager attention, non-trivial norms and biases."""
    family, kwargs = CASES[case]
    config_cls, model_cls = (
        (DeepseekV2Config, DeepseekV2ForCausalLM) if family == "v2" else (DeepseekV3Config, DeepseekV3ForCausalLM)
    )
    config = config_cls(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.uniform_(0.5, 1.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.1, 0.1)
    return model
