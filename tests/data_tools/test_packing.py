import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from align.models import build_model
from data_tools.datasets import tokenize_dataset
from data_tools.packing import (
    IGNORE_INDEX,
    collate_packed,
    pack_best_fit,
    packing_efficiency,
    pad_batch,
    pad_tail_start,
)
from data_tools.synthetic import arithmetic_rows
from data_tools.tokenizer import load_tokenizer

PAD = 2


def random_examples(n: int, seed: int, max_len: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [1000 + i] * length
        labels = [IGNORE_INDEX if rng.random() < 0.3 else 5000 + i for _ in range(length)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def documents(row: dict) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, [*starts[1:], len(row["position_ids"])], strict=True))


def test_rows_are_seq_len_and_hold_every_token_once():
    examples = random_examples(60, seed=0, max_len=50)
    rows = pack_best_fit(examples, seq_len=64, pad_id=PAD)
    assert all(len(row[key]) == 64 for row in rows for key in ("input_ids", "labels", "position_ids"))
    packed = Counter(t for row in rows for t in row["input_ids"] if t != PAD)
    assert packed == Counter(t for e in examples for t in e["input_ids"])
    assert len(rows) >= -(-sum(len(e["input_ids"]) for e in examples) // 64)


def test_positions_restart_per_document_and_labels_are_safe():
    examples = random_examples(40, seed=1, max_len=30)
    rows = pack_best_fit(examples, seq_len=48, pad_id=PAD)
    seen = 0
    for row in rows:
        for start, end in documents(row):
            ids = row["input_ids"][start:end]
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX
            if ids[0] == PAD:
                assert set(ids) == {PAD} and set(row["labels"][start:end]) == {IGNORE_INDEX}
                continue
            example = examples[ids[0] - 1000]
            assert ids == example["input_ids"]
            assert row["labels"][start + 1 : end] == example["labels"][1:]
            seen += 1
    assert seen == len(examples)


def test_best_fit_is_deterministic_and_tight():
    examples = random_examples(200, seed=2, max_len=100)
    rows = pack_best_fit(examples, seq_len=128, pad_id=PAD)
    assert rows == pack_best_fit(examples, seq_len=128, pad_id=PAD)
    assert packing_efficiency(rows, pad_id=PAD) > 0.9
    assert packing_efficiency(rows) == packing_efficiency(rows, pad_id=PAD)
    sizes = [[4], [4], [2, 2], [3, 1]]
    exact = pack_best_fit([{"input_ids": [7] * n, "labels": [7] * n} for s in sizes for n in s], 4, PAD)
    assert len(exact) == 4 and packing_efficiency(exact, pad_id=PAD) == 1.0


def test_packing_rejects_bad_examples():
    with pytest.raises(ValueError, match="example 1: 9 tokens"):
        pack_best_fit([{"input_ids": [1], "labels": [1]}, {"input_ids": [1] * 9, "labels": [1] * 9}], 8, PAD)
    with pytest.raises(ValueError, match="example 0: input_ids has 2 tokens but labels has 1"):
        pack_best_fit([{"input_ids": [1, 2], "labels": [1]}], 8, PAD)


def test_collate_packed_masks_only_the_padding_tail():
    rows = pack_best_fit([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                         seq_len=6, pad_id=PAD)
    assert rows == [{"input_ids": [5, 6, 7, 8, PAD, PAD], "labels": [-100, 6, 7, -100, -100, -100],
                     "position_ids": [0, 1, 2, 0, 0, 1]}]
    assert pad_tail_start(rows[0], PAD) == 4
    batch = collate_packed(rows, PAD)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].dtype == torch.long and batch["input_ids"].shape == (1, 6)


def test_pad_batch():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                      pad_id=PAD, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD], [8, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_packed_row_gives_the_same_loss_as_separate_documents():
    tok = load_tokenizer("tiny")
    examples, _ = tokenize_dataset(arithmetic_rows(6, seed=0), tok, max_length=64, train_on="all")
    rows = pack_best_fit(examples, seq_len=80, pad_id=tok.pad_token_id)
    model = build_model("tiny", seed=1).eval()
    checked = 0
    with torch.no_grad():
        for row in rows:
            batch = collate_packed([row], tok.pad_token_id)
            logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            real = pad_tail_start(row, tok.pad_token_id)
            torch.testing.assert_close(model(**batch).logits[0, :real], logits[:real], rtol=1e-5, atol=1e-5)
            labels = batch["labels"][0]
            for start, end in documents(row)[: -1 if real < 80 else None]:
                ids = batch["input_ids"][0, start:end]
                alone = model(ids[None]).logits[0]
                torch.testing.assert_close(logits[start:end], alone, rtol=1e-4, atol=1e-4)
                packed_loss = F.cross_entropy(logits[start : end - 1], labels[start + 1 : end], reduction="sum")
                alone_loss = F.cross_entropy(alone[:-1], ids[1:], reduction="sum")
                torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)
                checked += 1
            whole = F.cross_entropy(logits[:-1], labels[1:], reduction="sum", ignore_index=IGNORE_INDEX)
            per_doc = sum(F.cross_entropy(logits[s : e - 1], labels[s + 1 : e], reduction="sum",
                                          ignore_index=IGNORE_INDEX) for s, e in documents(row) if e - s > 1)
            torch.testing.assert_close(whole, per_doc, rtol=1e-5, atol=1e-4)
    assert checked == len(examples) and len(rows) < len(examples)
