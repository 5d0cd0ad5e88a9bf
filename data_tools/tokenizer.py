"""Tokenizer loading: the committed tiny tokenizer, or a local Hugging Face tokenizer directory."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"

# Verbatim from DeepSeek-V2-Chat / V2-Lite-Chat tokenizer_config.json.
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Templates by name, for recipes' tokenizer.chat_template and `align generate --chat-template`.
CHAT_TEMPLATES = {"deepseek_v2": DEEPSEEK_V2_CHAT_TEMPLATE}

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_tokenizer_path(path_or_name: str | os.PathLike | None) -> Path:
    if path_or_name is None or str(path_or_name) == "tiny":
        return TINY_TOKENIZER_DIR
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {str(path)!r} does not exist; expected 'tiny' or a local directory "
            f"holding a Hugging Face tokenizer (one of {', '.join(TOKENIZER_FILES)})"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer directory {str(path)!r} has no tokenizer files; expected one of "
            f"{', '.join(TOKENIZER_FILES)} (e.g. a directory written by tokenizer.save_pretrained)"
        )
    return path


def load_tokenizer(
    path_or_name: str | os.PathLike | None = None, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Load 'tiny' (or None) or a local tokenizer directory; never touches the network.

    `chat_template` replaces the directory's template (e.g. DEEPSEEK_V2_CHAT_TEMPLATE for a
    tokenizer saved without one). The result must have a chat template and an EOS token.
    """
    path = resolve_tokenizer_path(path_or_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {err}") from err
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer at {str(path)!r} has no chat_template (tokenizer_config.json 'chat_template' "
            "or chat_template.jinja); pass chat_template=..., "
            "e.g. data_tools.tokenizer.DEEPSEEK_V2_CHAT_TEMPLATE"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {str(path)!r} has no eos_token; set 'eos_token' in tokenizer_config.json"
        )
    return tokenizer


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (padded positions are
    masked out, so any id works; EOS is one every loaded tokenizer has)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
