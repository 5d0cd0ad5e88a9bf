import json
import logging

import datasets
import pytest

from data_tools.chat import IGNORE_INDEX, tokenize_conversation
from data_tools.datasets import DataStats, detect_format, load_rows, to_standard, tokenize_dataset
from data_tools.tokenizer import load_tokenizer

CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
]
ROWS = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello there"}]}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_load_jsonl_json_parquet(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS), encoding="utf-8")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    for path in (jsonl, tmp_path / "b.json", str(tmp_path / "c.parquet")):
        rows = load_rows(path)
        assert len(rows) == 2 and rows[0]["messages"] == CHAT


def test_load_saved_dataset_and_dict_dirs(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_rows(tmp_path / "single")) == 2
    assert len(load_rows(tmp_path / "dd")) == 2
    assert len(load_rows(tmp_path / "dd", split="test")) == 1
    with pytest.raises(ValueError, match="no split 'dev'; available splits: train, test"):
        load_rows(tmp_path / "dd", split="dev")
    with pytest.raises(ValueError, match="single dataset without splits"):
        load_rows(tmp_path / "single", split="test")


def test_load_split_files_in_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(load_rows(tmp_path)) == 2
    assert len(load_rows(tmp_path, split="test")) == 1
    with pytest.raises(ValueError, match=r"no dev\.jsonl"):
        load_rows(tmp_path, split="dev")


def test_load_errors_name_path_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*\.jsonl / \.json / \.parquet"):
        load_rows(tmp_path / "missing.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"rows\.csv.*unsupported extension '\.csv'.*\.parquet"):
        load_rows(csv)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"messages": [}\n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: invalid JSON at line 3"):
        load_rows(path)
    array = tmp_path / "bad.json"
    array.write_text("[\n" + json.dumps(ROWS[0]) + ",\n" + '{messages: 1}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3"):
        load_rows(array)


def test_on_error_skip_skips_lines_that_are_not_json_objects(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n[1, 2]\n\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl: invalid JSON at line 2.*data.on_error=skip skips"):
        load_rows(path)
    with caplog.at_level(logging.WARNING, logger="data_tools.datasets"):
        rows = load_rows(path, on_error="skip")
    assert [row["messages"] for row in rows] == [ROWS[0]["messages"], ROWS[1]["messages"]]
    assert "rows.jsonl: skipped 2 line(s) that are not JSON objects" in caplog.text
    assert "line 2: Expecting property name" in caplog.text and "line 3: a JSON list, not an object" in caplog.text
    (tmp_path / "none.jsonl").write_text("oops\n")
    with pytest.raises(ValueError, match=r"none\.jsonl: no line is a JSON object \(first problem: line 1"):
        load_rows(tmp_path / "none.jsonl", on_error="skip")
    assert len(load_rows(write_jsonl(tmp_path / "ok.jsonl", ROWS), on_error="skip")) == 2


USER, REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(("bad", "good", "message"), [
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, ROWS[0],
     "row 1: message 1 is an empty assistant reply"),
    ({"messages": [USER, REPLY, {"role": "user", "content": "and?"}]}, ROWS[0],
     "row 1: the conversation ends with a 'user' message, not an assistant reply"),
    ({"prompt": "Q: 1 + 1 =", "completion": ""}, {"prompt": "Q: 1 + 1 =", "completion": " 2"},
     "row 1: the completion is an empty assistant reply"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]},
     {"prompt": [USER], "completion": [REPLY]}, "row 1: the completion is an empty assistant reply"),
    ({"instruction": "Say hi", "output": ""}, {"instruction": "Say hi", "output": "hi"},
     "row 1: message 1 is an empty assistant reply"),
])
def test_rows_without_a_reply_to_train_are_errors_or_skipped(tok, bad, good, message):
    for train_on in ("assistant", "all"):
        with pytest.raises(ValueError, match=f"d.jsonl: {message}"):
            tokenize_dataset([bad, good], tok, max_length=64, train_on=train_on, source="d.jsonl")
    examples, stats = tokenize_dataset([bad, good], tok, max_length=64, source="d.jsonl", on_error="skip")
    assert len(examples) == 1 and stats.skipped_malformed == 1
    assert f"skipped malformed 1 (the first: d.jsonl: {message}" in stats.summary()


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["messages", "prompt", "answer"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["conversations", "id"], "sharegpt"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "system"], "alpaca"),
        (["text"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_unknown_lists_expected():
    with pytest.raises(ValueError, match=r"\['answer', 'question'\].*'messages'.*Alpaca"):
        detect_format(["question", "answer"])


def test_sharegpt_converter():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}]}
    assert to_standard(row, "sharegpt") == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(ValueError, match=r"row 7: conversations\[1\] 'from' is 'bot'"):
        to_standard({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
                    "sharegpt", where="row 7")


def test_alpaca_converter():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be exact."}
    assert to_standard(row, "alpaca")["messages"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    bare = to_standard({"instruction": "Say hi.", "input": "", "output": "hi", "system": None}, "alpaca")
    assert bare["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(ValueError, match="'output' must be a string"):
        to_standard({"instruction": "x", "output": None}, "alpaca")


def test_messages_and_prompt_completion_pass_through():
    assert to_standard({"messages": CHAT, "answer": "5"}, "messages") == {"messages": CHAT}
    row = {"prompt": CHAT[:1], "completion": CHAT[1:], "extra": 1}
    assert to_standard(row, "prompt_completion") == {"prompt": CHAT[:1], "completion": CHAT[1:]}
    assert to_standard({"text": "abc"}, "text") == {"text": "abc"}


def test_every_format_tokenizes_to_the_same_example(tok):
    expected = tokenize_conversation(tok, CHAT)
    rows = {
        "messages": [{"messages": CHAT}],
        "prompt_completion": [{"prompt": CHAT[:1], "completion": CHAT[1:]}],
        "sharegpt": [{"conversations": [{"from": "human", "value": CHAT[0]["content"]},
                                        {"from": "gpt", "value": "5"}]}],
        "alpaca": [{"instruction": CHAT[0]["content"], "input": "", "output": "5"}],
    }
    for fmt, data in rows.items():
        examples, stats = tokenize_dataset(datasets.Dataset.from_list(data), tok, max_length=64)
        assert (examples[0]["input_ids"], examples[0]["labels"]) == expected, fmt
        assert stats.kept == 1


def test_train_on_all(tok):
    examples, stats = tokenize_dataset(ROWS, tok, max_length=64, train_on="all")
    assert examples[0]["labels"][0] == IGNORE_INDEX
    assert examples[0]["labels"][1:] == examples[0]["input_ids"][1:]
    assert stats.trained_tokens == stats.tokens - 2


def test_malformed_row_names_source_and_row(tok, tmp_path):
    rows = ROWS + [{"messages": [{"role": "robot", "content": "x"}]}, {"messages": "oops"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = load_rows(path)
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 3: message 0 field 'role' is 'robot'"):
        tokenize_dataset(data, tok, max_length=64, source=str(path))
    examples, stats = tokenize_dataset(data, tok, max_length=64, source=str(path), on_error="skip")
    assert len(examples) == stats.kept == 2
    assert stats.skipped_malformed == 2 and stats.rows == 4


def test_malformed_sharegpt_and_missing_assistant(tok):
    data = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "human", "value": "a"}]}]
    with pytest.raises(ValueError, match="d.jsonl: row 2: no assistant message"):
        tokenize_dataset(data, tok, max_length=64, source="d.jsonl")


def test_truncation_right_and_drop(tok):
    long_reply = {"messages": [{"role": "user", "content": "Count."},
                               {"role": "assistant", "content": " ".join(["one two three"] * 20)}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 80},
                                {"role": "assistant", "content": "ok"}]}
    rows = ROWS + [long_reply, long_prompt]
    lengths = [len(tokenize_conversation(tok, row["messages"])[0]) for row in rows]
    limit = 40
    assert max(lengths[:2]) <= limit < min(lengths[2:])

    kept, stats = tokenize_dataset(rows, tok, max_length=limit, truncation="right")
    assert [len(e["input_ids"]) for e in kept] == [*lengths[:2], limit]
    assert (stats.truncated, stats.dropped_no_trained, stats.dropped_too_long) == (1, 1, 0)
    assert kept[2]["labels"][-1] != IGNORE_INDEX

    kept, stats = tokenize_dataset(rows, tok, max_length=limit, truncation="drop")
    assert len(kept) == 2
    assert (stats.truncated, stats.dropped_no_trained, stats.dropped_too_long) == (0, 0, 2)


def test_stats_and_summary(tok):
    examples, stats = tokenize_dataset(ROWS, tok, max_length=64, source="x.jsonl")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert (stats.rows, stats.kept) == (2, 2)
    assert stats.tokens == sum(lengths)
    assert stats.trained_tokens == sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples)
    assert (stats.length_min, stats.length_max, stats.length_p95) == (lengths[0], lengths[1], lengths[1])
    assert stats.length_p50 == lengths[0] and stats.length_mean == sum(lengths) / 2
    text = stats.summary()
    assert "x.jsonl: 2 rows -> 2 examples" in text and f"p95 {lengths[1]}" in text
    assert stats.as_dict()["kept"] == 2
    assert DataStats().summary()


def test_bad_arguments(tok):
    for kwargs, message in [({"truncation": "left"}, "truncation"), ({"on_error": "ignore"}, "on_error"),
                            ({"train_on": "user"}, "train_on"), ({"max_length": 0}, "max_length")]:
        with pytest.raises(ValueError, match=message):
            tokenize_dataset(ROWS, tok, **{"max_length": 8, **kwargs})


def test_repeated_rows_tokenize_like_single_ones_and_errors_keep_their_row_number(tok, tmp_path):
    bad = {"messages": [{"role": "robot", "content": "x"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [*ROWS, ROWS[0], bad, ROWS[1], bad])
    examples, stats = tokenize_dataset(load_rows(path), tok, max_length=64, source=str(path), on_error="skip")
    singles = [tokenize_dataset([row], tok, max_length=64)[0][0] for row in ROWS]
    assert examples == [singles[0], singles[1], singles[0], singles[1]]
    assert examples[0] is not examples[2]  # each row its own example, not a shared one
    assert stats.skipped_malformed == 2 and stats.kept == 4 and stats.tokens == sum(map(len, (
        e["input_ids"] for e in examples)))
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 4: "):
        tokenize_dataset(load_rows(path), tok, max_length=64, source=str(path))
