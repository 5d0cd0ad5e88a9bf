import json
import re

import pytest

from data_tools.datasets import detect_format, load_rows, tokenize_dataset
from data_tools.jsonl import write_jsonl
from data_tools.synthetic import (
    arithmetic_rows,
    arithmetic_splits,
    main,
    problem_count,
)
from data_tools.tokenizer import load_tokenizer

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def parse(row: dict) -> tuple[int, str, int]:
    a, op, b = QUESTION.fullmatch(row["messages"][0]["content"]).groups()
    return int(a), op, int(b)


def test_rows_shape_and_answers_are_correct():
    rows = arithmetic_rows(500, seed=3, ops="+-*")
    for row in rows:
        a, op, b = parse(row)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert row["answer"] == row["messages"][1]["content"] == str(value)
        assert value >= 0 and 0 <= a <= 99 and 0 <= b <= 99
        assert row["messages"][1]["role"] == "assistant"
        assert row["prompt"] == row["messages"][:1] and row["prompt"][0]["role"] == "user"
    assert {parse(row)[1] for row in rows} == {"+", "-", "*"}
    assert len({parse(row) for row in rows}) == 500


def test_deterministic_and_prefix_stable():
    assert arithmetic_rows(300, seed=7) == arithmetic_rows(300, seed=7)
    assert arithmetic_rows(300, seed=7)[:100] == arithmetic_rows(100, seed=7)
    assert arithmetic_rows(100, seed=7) != arithmetic_rows(100, seed=8)


def test_whole_problem_space_can_be_drawn():
    assert problem_count(9, "+-") == 100 + 55
    rows = arithmetic_rows(155, seed=0, max_operand=9)
    assert len({parse(row) for row in rows}) == 155
    with pytest.raises(ValueError, match="only 155 distinct"):
        arithmetic_rows(156, seed=0, max_operand=9)
    with pytest.raises(ValueError, match="ops is '/'"):
        arithmetic_rows(1, seed=0, ops="/")


def test_splits_are_disjoint_and_test_is_stable():
    train, test = arithmetic_splits(2000, 200, seed=1)
    assert len(train) == 2000 and len(test) == 200
    assert not {parse(r) for r in train} & {parse(r) for r in test}
    assert arithmetic_splits(50, 200, seed=1)[1] == test


def test_cli_writes_disjoint_files(tmp_path, capsys):
    main(["--out", str(tmp_path / "arith"), "--train", "300", "--test", "40", "--seed", "5"])
    train = [json.loads(line) for line in (tmp_path / "arith" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "arith" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (300, 40)
    assert not {parse(r) for r in train} & {parse(r) for r in test}
    assert (train, test) == arithmetic_splits(300, 40, seed=5)
    assert "wrote 300 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="only 155 distinct"):
        main(["--out", str(tmp_path / "x"), "--train", "150", "--test", "10", "--max-operand", "9"])


def test_rows_load_and_tokenize_as_sft_data(tmp_path):
    path = write_jsonl(arithmetic_rows(20, seed=0), tmp_path / "a.jsonl")
    rows = load_rows(path)
    assert detect_format(rows.column_names) == "messages"
    tok = load_tokenizer("tiny")
    examples, stats = tokenize_dataset(rows, tok, max_length=32)
    assert stats.kept == 20 and stats.length_max <= 24
    trained = [t for t, label in zip(examples[0]["input_ids"], examples[0]["labels"], strict=True) if label != -100]
    assert tok.decode(trained) == " " + rows[0]["answer"] + tok.eos_token


def test_teacher_error_forgets_borrows_in_training_replies_only():
    from data_tools.synthetic import needs_borrow, solve

    train, test = arithmetic_splits(3000, 200, seed=0, teacher_error=0.7)
    clean_train, clean_test = arithmetic_splits(3000, 200, seed=0)
    assert test == clean_test  # held-out rows are always right
    wrong = borrow = 0
    for row, clean in zip(train, clean_train, strict=True):
        a, op, b = row["prompt"][0]["content"][len("What is "):-1].split()
        a, b = int(a), int(b)
        assert row["answer"] == clean["answer"] == str(solve(a, op, b))  # the reward's gold stays right
        reply = row["messages"][1]["content"]
        borrow += needs_borrow(a, op, b)
        if reply != row["answer"]:
            assert needs_borrow(a, op, b) and reply == str(a - b + 10)
            wrong += 1
    assert 0.6 < wrong / borrow < 0.8
    with pytest.raises(ValueError, match="teacher_error"):
        arithmetic_splits(10, 10, seed=0, teacher_error=1.5)


def test_replies_per_problem_repeats_each_problem_with_its_own_teacher_draw():
    from data_tools.synthetic import needs_borrow

    once, test_once = arithmetic_splits(2000, 100, seed=0, teacher_error=0.8)
    train, test = arithmetic_splits(2000, 100, seed=0, teacher_error=0.8, replies_per_problem=5)
    assert test == test_once and len(train) == 5 * len(once)
    mixed = 0
    for i, base in enumerate(once):
        group = train[5 * i : 5 * i + 5]
        assert {row["prompt"][0]["content"] for row in group} == {base["prompt"][0]["content"]}
        assert {row["answer"] for row in group} == {base["answer"]}
        a, op, b = base["prompt"][0]["content"][len("What is "):-1].split()
        replies = {row["messages"][1]["content"] for row in group}
        if needs_borrow(int(a), op, int(b)):
            mixed += len(replies) == 2  # both the bug and the right answer for the same problem
        else:
            assert replies == {base["answer"]}
    assert mixed > 50
    with pytest.raises(ValueError, match="replies_per_problem"):
        arithmetic_splits(10, 10, seed=0, replies_per_problem=0)


def test_write_jsonl_is_atomic(tmp_path):
    path = write_jsonl([{"a": "é"}], tmp_path / "sub" / "x.jsonl")
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n'

    def broken():
        yield {"a": 2}
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), path)
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n'  # the old file stays whole
    assert [p.name for p in path.parent.iterdir()] == ["x.jsonl"]  # and no temporary file is left
