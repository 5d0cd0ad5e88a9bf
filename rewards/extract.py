"""Final-answer extraction and normalization shared by the answer-checking rewards.

Extraction modes (``extract_answer(text, mode, markers)``):

- ``last_number``: the last number in the text (``-1,234.5`` style, commas kept for
  :func:`normalize` to drop);
- ``boxed``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced;
- ``marker``: the text after the last occurrence of any marker (default ``####`` and
  ``The answer is``), up to the end of that line, trailing ``.`` removed;
- ``answer_tag``: the content of the last ``<answer>...</answer>``;
- ``whole``: the whole text.

Every mode returns ``None`` when it finds nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_MARKERS = ("####", "The answer is")
EXTRACT_MODES = ("last_number", "boxed", "marker", "answer_tag", "whole")

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMERIC = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, else None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def after_marker(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> str | None:
    best = -1
    best_len = 0
    for marker in markers:
        at = text.rfind(marker)
        if at > best:
            best, best_len = at, len(marker)
    if best < 0:
        return None
    rest = text[best + best_len :].lstrip(" :\t")
    line = rest.splitlines()[0] if rest.strip() else ""
    line = line.strip().rstrip(".").strip()
    return line or None


def answer_tag(text: str) -> str | None:
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str, mode: str = "last_number", markers: Sequence[str] = DEFAULT_MARKERS) -> str | None:
    """Extract the final answer from ``text`` according to ``mode`` (see module docstring)."""
    if mode == "last_number":
        return last_number(text)
    if mode == "boxed":
        return last_boxed(text)
    if mode == "marker":
        return after_marker(text, markers)
    if mode == "answer_tag":
        return answer_tag(text)
    if mode == "whole":
        return text
    raise ValueError(f"unknown extract mode {mode!r}; valid: {', '.join(EXTRACT_MODES)}")


def normalize(value: str, *, strip: bool = True, case_sensitive: bool = False, remove_commas: bool = True) -> str:
    """Normalize an answer for comparison; commas are removed only inside numbers (``1,234``)."""
    if remove_commas:
        value = re.sub(r"(?<=\d),(?=\d{3}\b)", "", value)
    if strip:
        value = " ".join(value.split())
        value = value.strip().strip("$").strip()
    if not case_sensitive:
        value = value.casefold()
    return value


def as_number(value: str) -> float | None:
    """``value`` as a float when it is exactly one number, else None."""
    return float(value) if _NUMERIC.fullmatch(value.strip()) else None
