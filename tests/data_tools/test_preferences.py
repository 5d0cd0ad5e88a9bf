"""Preference pairs: TRL's formats, margins, errors naming the row; the synthetic arithmetic pairs."""

from __future__ import annotations

import pytest

from data_tools.preferences import tokenize_pairs
from data_tools.synthetic import needs_borrow, solve
from data_tools.synthetic_preferences import preference_splits
from data_tools.tokenizer import load_tokenizer

USER = {"role": "user", "content": "What is 2 + 2?"}


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_explicit_and_implicit_formats_tokenize_alike(tok):
    explicit = [{"prompt": [USER], "chosen": reply("4"), "rejected": reply("5")}]
    implicit = [{"chosen": [USER, *reply("4")], "rejected": [USER, *reply("5")]}]
    a, _ = tokenize_pairs(explicit, tok, max_length=64)
    b, _ = tokenize_pairs(implicit, tok, max_length=64)
    assert a == b
    full = tok.apply_chat_template([USER, *reply("4")], tokenize=True, return_dict=False)
    assert a[0]["chosen_ids"] == list(full) and a[0]["chosen_ids"][-1] == tok.eos_token_id
    text, _ = tokenize_pairs([{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5}], tok, max_length=64)
    assert text[0]["margin"] == 1.5 and text[0]["chosen_ids"][0] == tok.bos_token_id


def test_too_long_pairs_are_dropped_and_counted(tok):
    rows = [{"prompt": [USER], "chosen": reply("4" * 80), "rejected": reply("5")},
            {"prompt": [USER], "chosen": reply("4"), "rejected": reply("5")}]
    pairs, stats = tokenize_pairs(rows, tok, max_length=40)
    assert len(pairs) == 1 and stats.dropped_too_long == 1


GOOD = {"prompt": [USER], "chosen": reply("4"), "rejected": reply("5")}


@pytest.mark.parametrize(("rows", "message"), [
    ([GOOD, {**GOOD, "prompt": "x"}], "'prompt' must be one too"),
    ([GOOD, {**GOOD, "chosen": "4"}], "both strings or both message lists"),
    ([{"chosen": [USER, *reply("4")], "rejected": [USER, *reply("5")]}, {"chosen": [USER], "rejected": [USER]}],
     "ends with a 'user' message"),
    ([GOOD, {**GOOD, "margin": "big"}], "'margin' must be"),
])
def test_bad_rows_name_source_and_row(tok, rows, message):
    with pytest.raises(ValueError, match=r"prefs.jsonl: row 2") as err:
        tokenize_pairs(rows, tok, max_length=64, source="prefs.jsonl")
    assert message in str(err.value)
    pairs, stats = tokenize_pairs(rows, tok, max_length=64, on_error="skip", source="prefs.jsonl")
    assert len(pairs) == 1 and stats.skipped_malformed == 1


def test_synthetic_pairs_are_disjoint_and_half_borrow_bugs():
    train, test = preference_splits(600, 100, seed=1)
    problem = lambda row: row["prompt"][0]["content"]  # noqa: E731
    assert not {problem(r) for r in train} & {problem(r) for r in test}
    assert preference_splits(300, 100, seed=1)[1] == test  # test pairs do not depend on n_train
    assert sum(r["wrong"] == "borrow" for r in train) == 300
    assert {r["wrong"] for r in train} == {"borrow", "random"}
    for row in train:
        a, op, b = row["prompt"][0]["content"][8:-1].split()
        a, b = int(a), int(b)
        assert row["chosen"][0]["content"] == row["answer"] == str(solve(a, op, b))
        assert row["rejected"][0]["content"] != row["answer"] and int(row["rejected"][0]["content"]) >= 0
        if row["wrong"] == "borrow":
            assert needs_borrow(a, op, b) and int(row["rejected"][0]["content"]) == solve(a, op, b) + 10


def test_likeliest_pairs_reject_the_given_mistakes():
    def off_by_one(problems):
        return [(str(solve(*p) + 1), 0.5) for p in problems]

    train, test = preference_splits(600, 100, seed=1, other_wrong="likeliest", mistakes=off_by_one)
    assert preference_splits(300, 100, seed=1, other_wrong="likeliest", mistakes=off_by_one)[1] == test
    assert {r["wrong"] for r in train} == {"borrow", "likeliest"}
    for row in train + test:
        if row["wrong"] == "likeliest":
            assert row["rejected"][0]["content"] == str(int(row["answer"]) + 1)
    with pytest.raises(ValueError, match="needs `mistakes`"):
        preference_splits(600, 100, seed=1, other_wrong="likeliest")
