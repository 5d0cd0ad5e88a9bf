"""Answer-correctness rewards: ``math`` (symbolic equivalence) and ``exact_match``.

``math`` params:
    gold_column (str | None, default None): column with the reference answer; None tries
        ``answer`` then ``solution``. The reference may be a bare answer (``0.5``), LaTeX
        (``$\\frac12$``) or a full solution ending in ``\\boxed{...}``.
    float_rounding (int, default 6): decimals used when comparing numbers.
    timeout_seconds (int, default 5): per parse/verify call. math-verify times out with
        SIGALRM, which only works in the main thread; elsewhere no timeout is applied.
    Scores 1.0 when the completion's last ``\\boxed{}`` (else its last expression) is
    equivalent to the reference, 0.0 otherwise, None when the reference cannot be parsed.
    Needs the ``math-verify`` package (imported on first use).

``exact_match`` params:
    answer_column (str, default ``answer``): reference column.
    extract (str, default ``last_number``): how to take the answer from the completion, one
        of ``last_number``, ``boxed``, ``marker``, ``answer_tag``, ``whole`` (see
        :mod:`rewards.extract`).
    gold_extract (str, default ``whole``): the same for the reference (``marker`` for GSM8K's
        ``... #### 72``); a reference where nothing is found scores None.
    markers (list[str], default ``["####", "The answer is"]``): used by ``marker``.
    strip, case_sensitive, remove_commas (bool, defaults True, False, True): normalization
        (:func:`rewards.extract.normalize`).
    numeric (bool, default True): when both sides are single numbers compare them as floats
        (so ``5.0`` equals ``5``).
    Scores 1.0 on a match, 0.0 otherwise (also when nothing could be extracted). With the default
    params this is :func:`rewards.extract.last_number_matches`, the exact-match eval's rule.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.extract import DEFAULT_MARKERS, EXTRACT_MODES, reply_matches
from rewards.registry import Scores, completion_text, register


def _gold_values(columns: dict[str, Any], gold_column: str | None) -> list[Any]:
    names = [gold_column] if gold_column else ["answer", "solution"]
    for name in names:
        if name in columns:
            return list(columns[name])
    raise KeyError(f"no reference column: expected one of {names} among columns {sorted(columns)}")


def _math_configs() -> tuple[list[Any], list[Any]]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    pred = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return gold, pred


@register("math")
def math_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    gold_column: str | None = None,
    float_rounding: int = 6,
    timeout_seconds: int = 5,
    **columns: Any,
) -> Scores:
    from math_verify import parse, verify

    gold_cfg, pred_cfg = _math_configs()
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    golds = _gold_values(columns, gold_column)
    out: Scores = []
    for completion, gold_raw in zip(completions, golds, strict=True):
        gold = parse(str(gold_raw), extraction_config=gold_cfg, parsing_timeout=timeout) if gold_raw else []
        if not gold:
            out.append(None)
            continue
        pred = parse(completion_text(completion), extraction_config=pred_cfg, parsing_timeout=timeout)
        ok = bool(pred) and verify(gold, pred, float_rounding=float_rounding, timeout_seconds=timeout)
        out.append(1.0 if ok else 0.0)
    return out


def _check_exact_match(params: Mapping[str, Any]) -> None:
    for key in ("extract", "gold_extract"):
        mode = params.get(key, "whole" if key == "gold_extract" else "last_number")
        if mode not in EXTRACT_MODES:
            raise ValueError(f"{key}={mode!r} is not one of {', '.join(EXTRACT_MODES)}")
    if isinstance(params.get("markers", ()), str):
        raise TypeError("markers must be a list of strings, not one string")


@register("exact_match", check=_check_exact_match)
def exact_match_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    answer_column: str = "answer",
    extract: str = "last_number",
    gold_extract: str = "whole",
    markers: Sequence[str] = DEFAULT_MARKERS,
    strip: bool = True,
    case_sensitive: bool = False,
    remove_commas: bool = True,
    numeric: bool = True,
    **columns: Any,
) -> Scores:
    _check_exact_match({"extract": extract, "gold_extract": gold_extract, "markers": markers})
    golds = _gold_values(columns, answer_column)
    rule = {"extract": extract, "reference_extract": gold_extract, "markers": markers, "numeric": numeric,
            "strip": strip, "case_sensitive": case_sensitive, "remove_commas": remove_commas}
    out: Scores = []
    for completion, gold_raw in zip(completions, golds, strict=True):
        ok = reply_matches(completion_text(completion), str(gold_raw), **rule) if gold_raw is not None else None
        out.append(None if ok is None else float(ok))
    return out
