"""Batches for SFT: best-fit-decreasing packing with per-document positions, or right padding.

A packed row is documents laid end to end, then a padding tail. position_ids restart at 0 for
every document and for the tail, which is how the model finds document boundaries (a position
that does not grow by one) and keeps attention inside each. Labels are unshifted (the loss
predicts labels[t + 1] from position t), so the first label of every document is IGNORE_INDEX:
otherwise the last token of one document would be trained to predict the next document.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from data_tools.chat import IGNORE_INDEX

Example = Mapping[str, Sequence[int]]


def _check_example(example: Example, index: int, seq_len: int) -> int:
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) != len(labels):
        raise ValueError(f"example {index}: input_ids has {len(ids)} tokens but labels has {len(labels)}")
    if not 0 < len(ids) <= seq_len:
        raise ValueError(
            f"example {index}: {len(ids)} tokens; packing needs 1..seq_len ({seq_len}) tokens per example "
            "(truncate or drop longer rows first, e.g. tokenize_dataset(max_length=seq_len))"
        )
    return len(ids)


def _assign_bins(lengths: list[int], seq_len: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            remaining, index = seq_len - lengths[i], len(bins) - 1
        else:
            remaining, index = free.pop(at)
            bins[index].append(i)
            remaining -= lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, index))
    return bins


def _build_row(docs: list[Example], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in docs:
        ids += doc["input_ids"]
        labels += [IGNORE_INDEX, *doc["labels"][1:]]
        positions += range(len(doc["input_ids"]))
    tail = seq_len - len(ids)
    return {
        "input_ids": ids + [pad_id] * tail,
        "labels": labels + [IGNORE_INDEX] * tail,
        "position_ids": positions + list(range(tail)),
    }


def pack_best_fit(examples: Sequence[Example], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Rows of exactly seq_len tokens {"input_ids", "labels", "position_ids"} (lists of ints).

    Best-fit decreasing: longest examples first, each into the fullest row it still fits in.
    Deterministic: ties break by example order and row order. Every token of every example
    appears exactly once; only the first label of each document is changed (to IGNORE_INDEX).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = [_check_example(example, i, seq_len) for i, example in enumerate(examples)]
    bins = _assign_bins(lengths, seq_len)
    return [_build_row([examples[i] for i in members], seq_len, pad_id) for members in bins]


def pad_tail_start(row: Mapping[str, Sequence[int]], pad_id: int) -> int:
    """Index where a packed row's padding tail begins (len(row) when it has none)."""
    ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
    start = len(ids)
    while start > 0 and ids[start - 1] == pad_id and labels[start - 1] == IGNORE_INDEX:
        start -= 1
        if positions[start] == 0:
            return start
    return len(ids)


def packing_efficiency(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int | None = None) -> float:
    """Fraction of row positions holding document tokens (not padding).

    Without pad_id the padding id is the commonest last token of rows ending in a restarted,
    untrained run of one id (a heuristic: a one-token final document looks the same); pass pad_id
    to be exact.
    """
    total = sum(len(row["input_ids"]) for row in rows)
    if total == 0:
        return 0.0
    pad = pad_id if pad_id is not None else _guess_pad_id(rows)
    if pad is None:
        return 1.0
    return sum(pad_tail_start(row, pad) for row in rows) / total


def _guess_pad_id(rows: Sequence[Mapping[str, Sequence[int]]]) -> int | None:
    votes: Counter[int] = Counter()
    for row in rows:
        ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
        start = max(i for i, p in enumerate(positions) if p == 0)
        if start > 0 and len(set(ids[start:])) == 1 and set(labels[start:]) == {IGNORE_INDEX}:
            votes[ids[-1]] += 1
    return votes.most_common(1)[0][0] if votes else None


def collate_packed(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack packed rows: input_ids, labels, position_ids [B, S] (long) and attention_mask [B, S]
    (0 on the padding tail, so the MoE balance loss ignores it; attention is already per document)."""
    batch = {key: torch.tensor([list(row[key]) for row in rows], dtype=torch.long)
             for key in ("input_ids", "labels", "position_ids")}
    mask = torch.ones_like(batch["input_ids"])
    for b, row in enumerate(rows):
        mask[b, pad_tail_start(row, pad_id):] = 0
    batch["attention_mask"] = mask
    return batch


def pad_batch(
    examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch of unpacked examples: input_ids (pad_id), labels (IGNORE_INDEX on pads),
    attention_mask (1 = real token), all [B, S] long, S the longest example (rounded up)."""
    if not examples:
        raise ValueError("pad_batch: no examples")
    width = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[b, :n] = torch.as_tensor(list(example["input_ids"]), dtype=torch.long)
        labels[b, :n] = torch.as_tensor(list(example["labels"]), dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
