"""DeepSeek-V2 family: config, rope (YaRN), MLA, MoE, model, checkpoint I/O, presets."""

from align.models.checkpoint import CheckpointError, load_model, save_model
from align.models.config import ConfigError, config_from_dict, load_config
from align.models.model import CausalLMOutput, DeepseekV2ForCausalLM, DeepseekV2Model
from align.models.presets import PRESETS, build_model, preset_config
from align.models.sequence_classification import DeepseekV2ForSequenceClassification

__all__ = [
    "PRESETS", "CausalLMOutput", "CheckpointError", "ConfigError", "DeepseekV2ForCausalLM",
    "DeepseekV2ForSequenceClassification",
    "DeepseekV2Model", "build_model", "config_from_dict", "load_config", "load_model", "preset_config",
    "save_model",
]
