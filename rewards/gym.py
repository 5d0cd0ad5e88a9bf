"""``reasoning_gym`` reward: score with a reasoning-gym task's own ``score_answer``.

Each row carries a reasoning-gym entry split over columns, as ``reasoning_gym.create_dataset``
yields them:

- ``answer`` (``answer_column``): the reference answer string;
- ``metadata`` (``metadata_column``): the entry's metadata, a dict or its JSON string; the
  task name is ``metadata["source_dataset"]`` unless ``task_column`` names a column that
  holds it.

Params:
    answer_column (str, default ``answer``), metadata_column (str, default ``metadata``),
    task_column (str | None, default None): see above.
    extract (str, default ``answer_tag``): how the answer is taken from the completion
        (reasoning-gym's convention is ``<answer>...</answer>``; see :mod:`rewards.extract`).
        When nothing is found the task scores ``None`` as the answer (0.0 for every task).

The reward is the task's score (usually in [0, 1]). Rows without a task name score None,
and so does a row whose task scorer raises (logged). Needs the ``reasoning-gym`` package,
imported on first use; scorers are built once per task and process.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rewards.extract import EXTRACT_MODES, extract_answer
from rewards.registry import Scores, completion_text, prompt_text, register

logger = logging.getLogger(__name__)


@functools.cache
def score_fn_for(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    """The ``score_answer`` of reasoning-gym task ``task`` (cached per process)."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(
            "the reasoning_gym reward needs the 'reasoning-gym' package (pip install reasoning-gym)"
        ) from exc
    return reasoning_gym.get_score_answer_fn(task)


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata must be a dict or JSON object string, got {type(value).__name__}")
    return dict(value)


def _check(params: Mapping[str, Any]) -> None:
    if params.get("extract", "answer_tag") not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}, got {params.get('extract')!r}")


@register("reasoning_gym", check=_check)
def reasoning_gym_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    answer_column: str = "answer",
    metadata_column: str = "metadata",
    task_column: str | None = None,
    extract: str = "answer_tag",
    **columns: Any,
) -> Scores:
    n = len(completions)
    answers = columns.get(answer_column, [None] * n)
    metas = [_metadata(m) for m in columns.get(metadata_column, [None] * n)]
    tasks = columns[task_column] if task_column else [m.get("source_dataset") for m in metas]
    out: Scores = []
    for prompt, completion, answer, meta, task in zip(prompts, completions, answers, metas, tasks, strict=True):
        if not task:
            out.append(None)
            continue
        entry = {"question": prompt_text(prompt), "answer": answer, "metadata": meta}
        try:
            out.append(float(score_fn_for(task)(extract_answer(completion_text(completion), extract), entry)))
        except Exception as exc:
            logger.warning("reasoning_gym task %r could not score a row: %s: %s", task, type(exc).__name__, exc)
            out.append(None)
    return out
