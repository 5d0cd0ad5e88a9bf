"""Model configuration: transformers' own DeepseekV2Config / DeepseekV3Config, validated.

A checkpoint directory's config.json is parsed by transformers (legacy `rope_scaling` becomes
`rope_parameters`; `auto_map` is kept as an inert attribute and never executed). This module adds
the checks transformers does not make, with errors that name the file and the key, and derives the
few settings the two families spell differently (scoring function, top-k method, MoE layer layout).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import DeepseekV2Config, DeepseekV3Config, PretrainedConfig

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "deepseek_v2": DeepseekV2Config,
    "deepseek_v3": DeepseekV3Config,
}

REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
MOE_KEYS = ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A config.json (or dict) that cannot describe a supported model."""


def config_from_dict(raw: dict, source: str = "<dict>") -> PretrainedConfig:
    """Validate `raw` (the content of a config.json) and build transformers' config object."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: key 'model_type' is {model_type!r}; supported: {', '.join(CONFIG_CLASSES)}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if raw.get("n_routed_experts"):
        missing += [k for k in MOE_KEYS if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing} for model_type {model_type!r}")
    config = CONFIG_CLASSES[model_type].from_dict(dict(raw))
    validate(config, source)
    return config


def load_config(path: str | Path) -> PretrainedConfig:
    """Read `path` (a checkpoint directory or a config.json file)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from err
    return config_from_dict(raw, str(file))


def scoring_func(config: PretrainedConfig) -> str:
    default = "sigmoid" if config.model_type == "deepseek_v3" else "softmax"
    return getattr(config, "scoring_func", None) or default


def topk_method(config: PretrainedConfig) -> str:
    default = "noaux_tc" if config.model_type == "deepseek_v3" else "greedy"
    return getattr(config, "topk_method", None) or default


def routing_weight_rule(config: PretrainedConfig) -> tuple[bool, float]:
    """(normalise the chosen top-k weights to sum 1?, then multiply them by this scale), per family.

    DeepSeek-V2's own modeling code normalises when `norm_topk_prob` (and top_k > 1) and otherwise
    scales by `routed_scaling_factor`: one or the other. V3's normalises (same condition), then scales.
    """
    normalise = bool(getattr(config, "norm_topk_prob", False)) and config.num_experts_per_tok > 1
    scale = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
    if config.model_type == "deepseek_v3":
        return normalise, scale
    return normalise, 1.0 if normalise else scale


def is_moe_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    freq = getattr(config, "moe_layer_freq", 1) or 1
    return bool(config.n_routed_experts) and layer_idx >= config.first_k_dense_replace and layer_idx % freq == 0


def moe_layers(config: PretrainedConfig) -> list[int]:
    """Indices of the decoder layers whose feed-forward is an MoE (routed experts)."""
    return [i for i in range(config.num_hidden_layers) if is_moe_layer(config, i)]


def num_groups(config: PretrainedConfig) -> int:
    return config.n_group or 1


def validate(config: PretrainedConfig, source: str = "<config>") -> None:
    """Cross-field checks; each error names the key and what would be valid."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' = {getattr(config, key, None)!r}: {why}")

    method, scoring = topk_method(config), scoring_func(config)
    if method not in TOPK_METHODS:
        raise bad("topk_method", f"valid: {', '.join(TOPK_METHODS)}")
    if scoring not in SCORING_FUNCS:
        raise bad("scoring_func", f"valid: {', '.join(SCORING_FUNCS)}")
    if method == "noaux_tc" and scoring != "sigmoid":
        raise bad("topk_method", "noaux_tc needs scoring_func 'sigmoid'")
    if config.n_routed_experts:
        if config.num_experts_per_tok > config.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be <= n_routed_experts ({config.n_routed_experts})")
        groups = num_groups(config)
        if config.n_routed_experts % groups:
            raise bad("n_group", f"must divide n_routed_experts ({config.n_routed_experts})")
        if method != "greedy" and not 1 <= (config.topk_group or groups) <= groups:
            raise bad("topk_group", f"must be in [1, n_group={groups}]")
    if config.qk_rope_head_dim % 2:
        raise bad("qk_rope_head_dim", "must be even")
    for key in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        if getattr(config, key) <= 0:
            raise bad(key, "must be positive")
