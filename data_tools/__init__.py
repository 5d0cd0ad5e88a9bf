"""Data layer: chat formatting + loss masks, tokenizers, converters, packing, synthetic tasks.

Exports are resolved lazily so that importing a light submodule does not import transformers.
"""

from importlib import import_module

_EXPORTS = {
    "IGNORE_INDEX": "chat",
    "render_prompt": "chat",
    "tokenize_conversation": "chat",
    "tokenize_prompt_completion": "chat",
    "tokenize_row": "chat",
    "validate_messages": "chat",
    "CHAT_TEMPLATES": "tokenizer",
    "DEEPSEEK_V2_CHAT_TEMPLATE": "tokenizer",
    "TINY_TOKENIZER_DIR": "tokenizer",
    "load_tokenizer": "tokenizer",
    "padding_id": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_tools' has no attribute {name!r}")
    return getattr(import_module(f"data_tools.{_EXPORTS[name]}"), name)
