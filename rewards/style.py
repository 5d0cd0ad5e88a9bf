"""Shape rewards: ``format`` (regex / tag structure) and ``length_penalty``.

``format`` params:
    tags (list[str], default ``["think", "answer"]`` when no pattern is given): the
        completion must be these tags in order, each ``<t>...</t>`` with content that does
        not itself contain ``<t>``/``</t>``, separated only by whitespace.
    pattern (str | None): a regular expression instead of ``tags`` (give one or the other).
        Compiled with ``re.DOTALL`` (``.`` matches newlines).
    mode (str, default ``fullmatch``): ``fullmatch`` (the whole completion must match) or
        ``search`` (anywhere).
    ignore_case (bool, default False).
    prefix (str, default ``""``): text prepended before matching, e.g. ``"<think>"`` when the
        prompt already opened the tag.
    Scores 1.0 on a match, 0.0 otherwise.

``length_penalty`` params:
    target (int, required): length with no penalty.
    max_length (int, required, > target): length where the penalty is full.
    scale (float, default 1.0): full penalty size.
    unit (str, default ``tokens``): ``tokens`` (length of the ``completion_ids`` column, which
        TRL and the GRPO loop pass), ``chars`` or ``words`` (whitespace split).
    Formula, with L the completion length::

        reward = -scale * min(1, max(0, L - target) / (max_length - target))

    i.e. 0 up to ``target``, a linear ramp down to ``-scale`` at ``max_length``, flat beyond.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.registry import Scores, completion_text, register

FORMAT_MODES = ("fullmatch", "search")
LENGTH_UNITS = ("tokens", "chars", "words")


def tags_pattern(tags: Sequence[str]) -> str:
    """Regex for ``<t1>...</t1> <t2>...</t2>`` with whitespace around and between the blocks."""
    blocks = []
    for tag in tags:
        t = re.escape(tag)
        blocks.append(rf"<{t}>(?:(?!</?{t}>).)*</{t}>")
    return r"\s*" + r"\s*".join(blocks) + r"\s*"


def _format_regex(params: Mapping[str, Any]) -> re.Pattern[str]:
    pattern, tags = params.get("pattern"), params.get("tags")
    if pattern is not None and tags is not None:
        raise ValueError("give either 'pattern' or 'tags', not both")
    if params.get("mode", "fullmatch") not in FORMAT_MODES:
        raise ValueError(f"mode must be one of {', '.join(FORMAT_MODES)}, got {params.get('mode')!r}")
    if pattern is None:
        tags = ["think", "answer"] if tags is None else tags
        if isinstance(tags, str) or not tags:
            raise TypeError("tags must be a non-empty list of tag names")
        pattern = tags_pattern(tags)
    flags = re.DOTALL | (re.IGNORECASE if params.get("ignore_case") else 0)
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from exc


@register("format", check=_format_regex)
def format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    tags: Sequence[str] | None = None,
    pattern: str | None = None,
    mode: str = "fullmatch",
    ignore_case: bool = False,
    prefix: str = "",
    **columns: Any,
) -> Scores:
    regex = _format_regex({"tags": tags, "pattern": pattern, "mode": mode, "ignore_case": ignore_case})
    match = regex.fullmatch if mode == "fullmatch" else regex.search
    return [1.0 if match(prefix + completion_text(c)) else 0.0 for c in completions]


def linear_length_penalty(length: int, target: int, max_length: int, scale: float = 1.0) -> float:
    """``-scale * min(1, max(0, length - target) / (max_length - target))``."""
    return -scale * min(1.0, max(0, length - target) / (max_length - target))


def _check_length(params: Mapping[str, Any]) -> None:
    target, max_length = params.get("target"), params.get("max_length")
    if not isinstance(target, int) or not isinstance(max_length, int) or not 0 <= target < max_length:
        raise ValueError(f"need integers 0 <= target < max_length, got target={target!r}, max_length={max_length!r}")
    if params.get("unit", "tokens") not in LENGTH_UNITS:
        raise ValueError(f"unit must be one of {', '.join(LENGTH_UNITS)}, got {params.get('unit')!r}")
    if params.get("scale", 1.0) < 0:
        raise ValueError("scale must be >= 0")


def _lengths(completions: Sequence[Any], unit: str, columns: Mapping[str, Any]) -> list[int]:
    if unit == "tokens":
        ids = columns.get("completion_ids")
        if ids is None:
            raise KeyError("unit 'tokens' needs the 'completion_ids' column; use unit 'chars' or 'words' without it")
        return [len(x) for x in ids]
    texts = [completion_text(c) for c in completions]
    return [len(t) for t in texts] if unit == "chars" else [len(t.split()) for t in texts]


@register("length_penalty", check=_check_length)
def length_penalty_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    target: int,
    max_length: int,
    scale: float = 1.0,
    unit: str = "tokens",
    **columns: Any,
) -> Scores:
    _check_length({"target": target, "max_length": max_length, "scale": scale, "unit": unit})
    return [linear_length_penalty(n, target, max_length, scale) for n in _lengths(completions, unit, columns)]
