"""Chat rendering and loss masks through the tokenizer's own chat template.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them),
IGNORE_INDEX where no loss is taken. Assistant-only masks are found by rendering prefixes of
the conversation, so the trained tokens are exactly those that follow the generation prompt,
i.e. what the model produces at generation time (for DeepSeek-V2: " " + reply + EOS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label of a position that takes no loss (PyTorch's and Hugging Face's default)
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]
Prompt = Sequence[Message] | str


def validate_messages(messages: object, where: str = "conversation") -> list[dict[str, str]]:
    """Check a conversation: a non-empty list of {"role", "content"} with known roles and str content."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError(f"{where}: the conversation is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where}: message {i} must be a dict with 'role' and 'content', got {message!r}"
            )
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise ValueError(f"{where}: message {i} has no '{key}' field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(
                f"{where}: message {i} field 'role' is {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: message {i} field 'content' must be a string, got {type(content).__name__}"
            )
        out.append(dict(message))
    return out


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation: bool
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation, tokenize=True, return_dict=False
    )
    return list(ids)


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, where: str = "prompt") -> list[int]:
    """Token ids that generation starts from: the template with its generation prompt, or BOS + plain text."""
    if isinstance(prompt, str):
        return _bos(tokenizer) + _encode(tokenizer, prompt)
    return _render(tokenizer, validate_messages(prompt, where), generation=True)


def _all_labels(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    labels = list(ids)
    if labels and labels[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    return labels


def _prefix_end(
    tokenizer: PreTrainedTokenizerBase, prefix: list[int], ids: list[int], where: str, what: str
) -> int:
    if ids[: len(prefix)] == prefix:
        return len(prefix)
    pairs = zip(prefix, ids, strict=False)
    k = next((j for j, (a, b) in enumerate(pairs) if a != b), min(len(prefix), len(ids)))
    ours, theirs = tokenizer.decode(prefix[k : k + 8]), tokenizer.decode(ids[k : k + 8])
    raise ValueError(
        f"{where}: the tokens of {what} are not a prefix of the whole sequence's tokens "
        f"(they diverge at token {k}: {ours!r} vs {theirs!r}); this chat template / tokenizer pair "
        "cannot give exact loss masks (the prompt must end on a token boundary)"
    )


def _assistant_labels(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    ids: list[int],
    turns: list[int],
    where: str,
) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for i in turns:
        if i == 0:
            raise ValueError(f"{where}: message 0 is an assistant reply; open with a system or user message")
        start = _prefix_end(
            tokenizer, _render(tokenizer, messages[:i], True), ids, where, f"messages[:{i}] + gen prompt"
        )
        end = _prefix_end(
            tokenizer, _render(tokenizer, messages[: i + 1], False), ids, where, f"messages[:{i + 1}]"
        )
        if end <= start:
            raise ValueError(
                f"{where}: assistant message {i} renders to no tokens after the generation prompt"
            )
        labels[start:end] = ids[start:end]
    return labels


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    train_on: Literal["assistant", "all"] = "assistant",
    where: str = "conversation",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a whole conversation.

    "assistant": only each assistant reply's tokens after the generation prompt (reply + EOS).
    "all": every token but a leading BOS.
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"{where}: train_on is {train_on!r}; expected 'assistant' or 'all'")
    checked = validate_messages(messages, where)
    ids = _render(tokenizer, checked, generation=False)
    if train_on == "all":
        return ids, _all_labels(tokenizer, ids)
    turns = [i for i, m in enumerate(checked) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{where}: no assistant message to train on (train_on='assistant')")
    return ids, _assistant_labels(tokenizer, checked, ids, turns, where)


def _text_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, where: str
) -> tuple[list[int], int]:
    prompt_ids = render_prompt(tokenizer, prompt)
    ids = _with_eos(tokenizer, _bos(tokenizer) + _encode(tokenizer, prompt + completion))
    start = _prefix_end(tokenizer, prompt_ids, ids, where, "the prompt")
    if start == len(ids):
        raise ValueError(f"{where}: the completion renders to no tokens")
    return ids, start


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    completion: Sequence[Message] | str,
    train_on: Literal["completion", "all"] = "completion",
    where: str = "row",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for TRL's prompt/completion formats.

    Conversational: prompt is a list of messages, completion a list with one assistant message.
    Plain text: BOS + prompt + completion + EOS (EOS added unless the completion ends with it).
    """
    if train_on not in ("completion", "all"):
        raise ValueError(f"{where}: train_on is {train_on!r}; expected 'completion' or 'all'")
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists")
    if isinstance(prompt, str):
        ids, start = _text_prompt_completion(tokenizer, prompt, completion, where)
        if train_on == "all":
            return ids, _all_labels(tokenizer, ids)
        return ids, [IGNORE_INDEX] * start + ids[start:]
    checked = validate_messages(prompt, f"{where} 'prompt'")
    reply = validate_messages(completion, f"{where} 'completion'")
    if len(reply) != 1 or reply[0]["role"] != "assistant":
        raise ValueError(f"{where}: 'completion' must hold exactly one assistant message")
    messages = checked + reply
    ids = _render(tokenizer, messages, generation=False)
    if train_on == "all":
        return ids, _all_labels(tokenizer, ids)
    return ids, _assistant_labels(tokenizer, messages, ids, [len(checked)], where)


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, object],
    train_on: Literal["assistant", "all"] = "assistant",
    where: str = "row",
) -> tuple[list[int], list[int]]:
    """Dispatch on TRL's dataset formats: 'messages', 'prompt' + 'completion', or 'text'.

    "assistant" trains assistant replies (or the completion); a 'text' row always trains everything.
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"{where}: train_on is {train_on!r}; expected 'assistant' or 'all'")
    if "messages" in row:
        return tokenize_conversation(tokenizer, row["messages"], train_on, where)
    if "prompt" in row and "completion" in row:
        mode = "completion" if train_on == "assistant" else "all"
        return tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], mode, where)
    if isinstance(row.get("text"), str):
        ids = _with_eos(tokenizer, _bos(tokenizer) + _encode(tokenizer, row["text"]))
        return ids, _all_labels(tokenizer, ids)
    raise ValueError(
        f"{where}: expected a 'messages' column, 'prompt' and 'completion' columns, or a 'text' string; "
        f"got columns {sorted(row)}"
    )
