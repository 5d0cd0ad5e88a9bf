"""Preference pairs for reward models, in TRL's formats, tokenized through the chat template.

Formats (by columns; TRL's preference types):
  chosen / rejected            each a whole conversation (message list ending with the assistant reply),
                               or a plain string (implicit prompt)
  prompt + chosen + rejected   prompt: a message list (or string); chosen / rejected: the assistant
                               message(s) that continue it (or strings appended to a string prompt)
  margin (optional)            a number per row: the loss becomes -log sigmoid(r_c - r_r - margin)

Each side is tokenized as the model will read it when scored: the chat template over the whole
conversation (BOS ... reply + EOS), or BOS + text + EOS. A pair with a side longer than `max_length` is
dropped and counted, as TRL does: cutting it would cut the reply whose end is scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from data_tools.chat import tokenize_row
from data_tools.datasets import check_replies, row_dicts

MARGIN = "margin"


def preference_format(columns: Sequence[str], source: str = "<data>") -> str:
    """'explicit' (prompt + chosen + rejected) or 'implicit' (chosen + rejected), from the columns."""
    names = set(columns)
    if not {"chosen", "rejected"} <= names:
        raise ValueError(f"{source}: preference data needs 'chosen' and 'rejected' columns (and optionally "
                         f"'prompt' and '{MARGIN}'), got columns {sorted(names)}")
    return "explicit" if "prompt" in names else "implicit"


def _side(row: Mapping[str, object], key: str, explicit: bool, where: str) -> dict:
    """One side of a pair as a standard row ({"messages"} or {"text"}) for data_tools.chat.tokenize_row."""
    reply = row.get(key)
    prompt = row.get("prompt") if explicit else None
    if isinstance(reply, str):
        if explicit and not isinstance(prompt, str):
            raise ValueError(f"{where}: '{key}' is a string but 'prompt' is not; both strings or both message lists")
        return {"text": (prompt or "") + reply}
    if not isinstance(reply, Sequence) or not reply:
        raise ValueError(f"{where}: '{key}' must be a non-empty message list or a string, got {reply!r:.80}")
    if explicit and (isinstance(prompt, str) or not isinstance(prompt, Sequence)):
        raise ValueError(f"{where}: '{key}' is a message list, so 'prompt' must be one too, got {prompt!r:.80}")
    return {"messages": list(prompt or []) + list(reply)}


def _ids(tokenizer, row: Mapping[str, object], key: str, explicit: bool, where: str) -> list[int]:
    side = _side(row, key, explicit, where)
    try:
        ids, _ = tokenize_row(tokenizer, side, "all", f"{where} '{key}'")
        check_replies(side, f"{where} '{key}'")
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{where} '{key}': malformed ({type(err).__name__}: {err})") from err
    return ids


def _margin(row: Mapping[str, object], where: str) -> float:
    value = row.get(MARGIN, 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: '{MARGIN}' must be a finite number, got {value!r}")
    return float(value)


@dataclass
class PairStats:
    source: str
    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    skipped_malformed: int = 0
    first_skipped: str = ""
    tokens: int = 0

    def summary(self) -> str:
        extra = f" (the first: {self.first_skipped})" if self.first_skipped else ""
        return (f"preferences {self.source}: {self.rows} pairs -> {self.kept} kept, {self.dropped_too_long} dropped "
                f"too long, {self.skipped_malformed} skipped malformed{extra}; {self.tokens:,} tokens")


def tokenize_pairs(rows, tokenizer, *, max_length: int, on_error: str = "raise",
                   source: str = "<data>") -> tuple[list[dict], PairStats]:
    """[{"chosen_ids", "rejected_ids", "margin"}] and stats. on_error 'raise' stops at the first malformed row,
    naming `source` and the 1-based row; 'skip' counts it."""
    columns = rows.column_names if hasattr(rows, "column_names") else list(rows[0]) if len(rows) else []
    explicit = preference_format(columns, source) == "explicit" if len(rows) else False
    stats, pairs = PairStats(source), []
    for number, row in enumerate(row_dicts(rows), start=1):
        stats.rows += 1
        where = f"{source}: row {number}"
        try:
            pair = {"chosen_ids": _ids(tokenizer, row, "chosen", explicit, where),
                    "rejected_ids": _ids(tokenizer, row, "rejected", explicit, where), MARGIN: _margin(row, where)}
        except ValueError as err:
            if on_error == "raise":
                raise
            stats.skipped_malformed += 1
            stats.first_skipped = stats.first_skipped or str(err)
            continue
        if max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) > max_length:
            stats.dropped_too_long += 1
            continue
        pairs.append(pair)
        stats.kept += 1
        stats.tokens += len(pair["chosen_ids"]) + len(pair["rejected_ids"])
    return pairs, stats
