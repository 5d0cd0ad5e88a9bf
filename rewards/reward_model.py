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
    model_class (str, default ``auto``): the class that runs the checkpoint. ``auto``: align's own
        ``align.models:DeepseekV2ForSequenceClassification`` (align's kernels, `align rm`'s output)
        when the checkpoint's config.json names that architecture, else transformers'
        ``AutoModelForSequenceClassification``; ``transformers``: always the latter; or any
        ``package.module:Class`` with ``from_pretrained(path, dtype=..., device_map=...)``. Classes
        are imported by name, as reward functions are, so this package imports nothing of align.

Text: when the tokenizer has a chat template, the prompt messages (a string prompt becomes
one user message) plus the completion as an assistant message are rendered with it and
tokenized without adding special tokens again; otherwise prompt text + completion text.
A completion that starts with the whitespace the template puts between the generation prompt
and the reply (DeepSeek-V2's ``Assistant:`` + `` 35``: the reply's first token carries the
space) has it removed first, so the text is the one the policy produced, rendered once.
The reward is the raw logit. Model and tokenizer load once per process and are reused.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.registry import Scores, as_messages, completion_text, prompt_text, register

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


ALIGN_CLASS = "align.models:DeepseekV2ForSequenceClassification"


def _model_class(path: str, model_class: str) -> Any:
    """The class to load `path` with; None = transformers' AutoModelForSequenceClassification."""
    if model_class == "transformers":
        return None
    if model_class == "auto":
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if ALIGN_CLASS.rsplit(":", 1)[1] not in (config.get("architectures") or []):
            return None
        if importlib.util.find_spec(ALIGN_CLASS.split(".", 1)[0]) is None:
            return None
        model_class = ALIGN_CLASS
    module, _, name = model_class.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model_class {model_class!r}: cannot import {name!r} from {module!r} ({err})") from err


@functools.lru_cache(maxsize=4)
def load_reward_model(path: str, device: str, dtype: str = "auto", model_class: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for ``path`` on ``device``, loaded once per process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cls = _model_class(path, model_class)
    if cls is None:
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True,
                                                                   dtype=getattr(torch, dtype))
    else:
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"reward model tokenizer at {path} has no pad, eos or unk token to pad with")
    tokenizer.truncation_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def reply_lead(tokenizer: Any, prompt: list[dict]) -> str:
    """The whitespace the chat template puts between the generation prompt and an assistant reply ('' if
    none, or if the template's generation prompt is not a prefix of the rendered conversation)."""
    marker = "\u2063reply"
    generation = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": marker}], tokenize=False)
    if marker not in whole or not whole.startswith(generation):
        return ""
    lead = whole[len(generation) : whole.index(marker)]
    return lead if not lead.strip() else ""


def pair_text(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """One (prompt, completion) pair as the reward model reads it."""
    if getattr(tokenizer, "chat_template", None):
        prompt, reply = as_messages(prompt), as_messages(completion, role="assistant")
        lead = reply_lead(tokenizer, prompt) if len(reply) == 1 else ""
        if lead and reply[0]["content"].startswith(lead):
            reply = [{**reply[0], "content": reply[0]["content"][len(lead) :]}]
        return tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    return prompt_text(prompt) + completion_text(completion)


def _check(params: Mapping[str, Any]) -> None:
    path = Path(str(params.get("model")))
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} is not a local model directory (no config.json)")
    if params.get("dtype", "auto") not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {params['dtype']!r}")
    model_class = params.get("model_class", "auto")
    if not isinstance(model_class, str) or (model_class not in ("auto", "transformers") and ":" not in model_class):
        raise ValueError(f"model_class must be 'auto', 'transformers' or 'package.module:Class', got {model_class!r}")
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
    model_class: str = "auto",
    **columns: Any,
) -> Scores:
    import torch

    net, tokenizer = load_reward_model(str(Path(model).resolve()), _device(device), dtype, model_class)
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
