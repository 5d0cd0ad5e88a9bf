"""Keep PEFT from rewriting DeepSeek LoRA targets.

peft >= 0.18 converts LoRA configs for transformers-v5 MoE models: for model_type deepseek_v2/v3
(mapped to the qwen2_moe pattern) every target named `gate_proj`, `up_proj` or `down_proj` is
turned into a *parameter* target on the stacked routed experts (`mlp.experts.gate_up_proj`,
`down_proj`) and removed from the module targets. In DeepSeek models those names also belong to
the shared experts and the dense MLP layers, which then silently get no adapter, while every
routed expert gets one. Inside `exact_lora_targets()` the conversion is skipped, so a config
means what it says: modules by name in `target_modules`, routed experts only via
`target_parameters`. Use it both when creating and when loading adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock


@contextlib.contextmanager
def exact_lora_targets() -> Iterator[None]:
    targets = ["peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers"]
    with contextlib.ExitStack() as stack:
        for target in targets:
            with contextlib.suppress(AttributeError, ModuleNotFoundError):
                stack.enter_context(mock.patch(target, lambda *args, **kwargs: None))
        yield
