"""`align generate` (align.commands.generate): JSONL prompts in, JSONL completions out; interactive chat on stdin."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from align.cli import build_parser, main
from align.commands.generate import main_generate
from align.models import build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    build_model("tiny", seed=2).save_pretrained(path)  # vocab 1024 = the tiny tokenizer's
    return path


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", *argv])


def test_jsonl_prompts_to_jsonl(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "What is 2+2?"}]},
        {"id": "b", "prompt": "Once upon a time"},
        {"id": "c", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "completions.jsonl"
    args = parse(str(model_dir), "--prompts", str(prompts), "--out", str(out), "--tokenizer", "tiny",
                 "--max-new-tokens", "5", "--n", "2", "--temperature", "0.8", "--seed", "1", "--device", "cpu")
    assert args.func is main_generate
    assert main_generate(args) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["a", "b", "c"]
    for row in written:
        assert "messages" not in row and "prompt" not in row
        assert len(row["completions"]) == 2
        for completion in row["completions"]:
            assert 1 <= len(completion["token_ids"]) <= 5
            assert len(completion["logprobs"]) == len(completion["token_ids"])
            assert isinstance(completion["text"], str)
            assert completion["finish_reason"] in ("stop", "length")


def test_bad_prompt_row_names_file_and_line(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    args = parse(str(model_dir), "--prompts", str(prompts), "--tokenizer", "tiny", "--device", "cpu")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object with exactly one of"):
        main_generate(args)
    bad = parse(str(model_dir), "--prompts", str(prompts), "--tokenizer", "tiny", "--top-p", "0")
    with pytest.raises(ValueError, match="top_p"):
        main_generate(bad)


def test_interactive_chat(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n/reset\nbye\n/exit\n"))
    out = tmp_path / "chat.jsonl"
    args = parse(str(model_dir), "--tokenizer", "tiny", "--max-new-tokens", "4", "--temperature", "0",
                 "--out", str(out), "--device", "cpu")
    assert main_generate(args) == 0
    assert capsys.readouterr().out.count("Assistant:") == 3
    chats = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert [[m["role"] for m in chat] for chat in chats] == [["user", "assistant"] * 2, ["user", "assistant"]]


def test_chat_template_by_name_and_the_old_spelling(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    common = ["--prompts", str(prompts), "--tokenizer", "tiny", "--max-new-tokens", "2", "--device", "cpu"]
    for name in ("deepseek_v2", "deepseek-v2"):
        assert main(["generate", str(model_dir), *common, "--chat-template", name, "--out", str(tmp_path / name)]) == 0
    assert "deepseek-v2 is now spelt deepseek_v2" in capsys.readouterr().err
    assert main(["generate", str(model_dir), *common, "--chat-template", "deepseek-v3"]) == 2
    assert "not one of 'deepseek_v2' and not a file" in capsys.readouterr().err
