"""Final-answer extraction, normalization and comparison: the one rule of "the answer is right".

The answer-checking rewards use it, and so does the greedy exact-match eval
(:func:`last_number_matches`), so ``eval/exact_match`` and the ``exact_match`` reward with its
default params score a reply alike.

The default rule, for math answers: the reply's answer is its **last** number (a worked solution
states the result at the end, after the intermediate numbers), compared with the reference taken
whole, both normalized by :func:`normalize` and compared as numbers when both are numbers (so
``68.0`` equals ``68`` and ``1,234`` equals ``1234``).

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


def answers_match(predicted: str, gold: str, *, numeric: bool = True, **norm: bool) -> bool:
    """Compare two extracted answers after :func:`normalize` (numerically when both are numbers)."""
    p, g = normalize(predicted, **norm), normalize(gold, **norm)
    if numeric:
        pn, gn = as_number(p), as_number(g)
        if pn is not None and gn is not None:
            return abs(pn - gn) <= 1e-9 * max(1.0, abs(gn))
    return p == g


def reply_matches(
    reply: str,
    reference: str,
    *,
    extract: str = "last_number",
    reference_extract: str = "whole",
    markers: Sequence[str] = DEFAULT_MARKERS,
    numeric: bool = True,
    **norm: bool,
) -> bool | None:
    """Whether the answer extracted from ``reply`` (mode ``extract``) equals the one extracted from
    ``reference`` (mode ``reference_extract``); None when the reference yields no answer. A reply
    that yields none does not match."""
    gold = extract_answer(reference, reference_extract, markers)
    if gold is None or not gold.strip():
        return None
    predicted = extract_answer(reply, extract, markers)
    return predicted is not None and answers_match(predicted, gold, numeric=numeric, **norm)


def last_number_matches(reply: str, answer: str) -> bool:
    """The default rule (module docstring): the last number in ``reply`` equals ``answer``. A blank
    ``answer`` matches nothing."""
    return bool(reply_matches(reply, answer))
