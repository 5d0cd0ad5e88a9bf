"""``reward_model`` reward: score (prompt, completion) pairs with a local sequence classifier.

Params:
    model (str, required): a local directory with a Hugging Face
        ``AutoModelForSequenceClassification`` checkpoint and its tokenizer (loaded with
        ``local_files_only=True``; nothing is downloaded).
    batch_size (int, default 8), max_length (int, default 2048): tokens per pair; longer
        pairs are cut from the left so the end of the completion is kept.
    device (str | None, default None): ``cuda`` when available, else ``cpu``.
    dtype (str, default ``auto``): ``auto`` (bfloat16 on cuda, float32 on cpu), ``float32``,
        ``bfloat16`` or ``float16``.
    label_index (int, default 0): which logit is the reward (0 for ``num_labels=1`` models).

Text: when the tokenizer has a chat template, the prompt messages (a string prompt becomes
one user message) plus the completion as an assistant message are rendered with it and
tokenized without adding special tokens again; otherwise prompt text + completion text.
The reward is the raw logit. Model and tokenizer load once per process and are reused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.registry import Scores, as_messages, completion_text, prompt_text, register

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str, device: str, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for ``path`` on ``device``, loaded once per process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"reward model tokenizer at {path} has no pad, eos or unk token to pad with")
    tokenizer.truncation_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def pair_text(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """One (prompt, completion) pair as the reward model reads it."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt) + as_messages(completion, role="assistant")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt_text(prompt) + completion_text(completion)


def _check(params: Mapping[str, Any]) -> None:
    path = Path(str(params.get("model")))
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} is not a local model directory (no config.json)")
    if params.get("dtype", "auto") not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {params['dtype']!r}")
    if params.get("batch_size", 8) < 1 or params.get("max_length", 2048) < 1:
        raise ValueError("batch_size and max_length must be >= 1")


@register("reward_model", check=_check)
def reward_model_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    model: str,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | None = None,
    dtype: str = "auto",
    label_index: int = 0,
    **columns: Any,
) -> Scores:
    import torch

    net, tokenizer = load_reward_model(str(Path(model).resolve()), _device(device), dtype)
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts = [pair_text(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    out: Scores = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=not templated,
        ).to(net.device)
        with torch.inference_mode():
            logits = net(**enc).logits
        out += logits[:, label_index].float().cpu().tolist()
    return out
