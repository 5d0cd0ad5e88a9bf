"""`align generate MODEL_DIR`: sample completions for JSONL prompts, or chat interactively.

Input rows (JSONL, one object per line): {"messages": [{"role", "content"}, ...]} is rendered with
the tokenizer's chat template and its generation prompt; {"prompt": "text"} is BOS + the text;
{"prompt": [messages]} is a conversation too. Every other key of the row is copied to the output.
Output rows: the input's other keys plus "completions": [{"text", "token_ids", "logprobs",
"finish_reason"}, ...] (n per row), written to --out atomically (or to stdout).
Without --prompts (or with --interactive) it reads user turns from stdin; /reset starts over,
/exit or end of input stops; --out then receives the conversations as {"messages": [...]} rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the engine load when the command runs, not when `align --help` builds its parser
    from align.generation.engine import GenerationEngine
    from align.generation.requests import Completion


def load_tokenizer(path: str, chat_template: str | None):
    """data_tools' loader (local directory or 'tiny'), with an optional template override: a name
    from data_tools.tokenizer.CHAT_TEMPLATES (as in recipes' tokenizer.chat_template) or a Jinja file."""
    from data_tools.tokenizer import CHAT_TEMPLATES
    from data_tools.tokenizer import load_tokenizer as load

    if chat_template == "deepseek-v2":
        print("warning: --chat-template deepseek-v2 is now spelt deepseek_v2, as in recipes; the old spelling "
              "will stop working", file=sys.stderr)
        chat_template = "deepseek_v2"
    template = None
    if chat_template in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[chat_template]
    elif chat_template is not None:
        file = Path(chat_template)
        if not file.is_file():
            names = ", ".join(map(repr, CHAT_TEMPLATES))
            raise FileNotFoundError(f"--chat-template {chat_template!r}: not one of {names} and not a file")
        template = file.read_text()
    return load(path, chat_template=template)


def read_prompts(path: str, tokenizer) -> tuple[list[dict], list[list[int]]]:
    """Rows (minus their prompt keys) and token ids; errors name the file and line."""
    from data_tools.chat import render_prompt

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path!r}: no such file")
    rows, ids = [], []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise ValueError(f"{where}: expected an object with exactly one of 'messages' or 'prompt'")
        prompt = row.pop("messages") if "messages" in row else row.pop("prompt")
        ids.append(render_prompt(tokenizer, prompt, where=where))
        rows.append(row)
    if not ids:
        raise ValueError(f"--prompts {path!r}: no prompts in the file")
    return rows, ids


def completion_json(tokenizer, completion: Completion) -> dict:
    return {
        "text": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
        "token_ids": completion.token_ids, "logprobs": completion.logprobs,
        "finish_reason": completion.finish_reason,
    }


def write_jsonl(rows: list[dict], out: str | None) -> None:
    """To the file `out` atomically (data_tools.jsonl), or to stdout when `out` is None."""
    from data_tools.jsonl import write_jsonl as write_file

    if out is None:
        sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    else:
        write_file(rows, out)


def sampling_kwargs(args, tokenizer) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "eos_token_id": tokenizer.eos_token_id,
        "stop_token_ids": args.stop_token_id,
    }


def run_batch(args, engine: GenerationEngine, tokenizer) -> None:
    rows, ids = read_prompts(args.prompts, tokenizer)
    results = engine.generate(ids, n=args.n, **sampling_kwargs(args, tokenizer))
    for row, completions in zip(rows, results, strict=True):
        row["completions"] = [completion_json(tokenizer, c) for c in completions]
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows x {args.n} completions to {args.out or 'stdout'}", file=sys.stderr)


def run_chat(args, engine: GenerationEngine, tokenizer) -> None:
    from data_tools.chat import render_prompt

    start = [{"role": "system", "content": args.system}] if args.system else []
    messages, transcripts = list(start), []
    print("chat: type a message; /reset starts over, /exit quits", file=sys.stderr)
    for line in sys.stdin:
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            if len(messages) > len(start):
                transcripts.append({"messages": messages})
            messages = list(start)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = render_prompt(tokenizer, messages)
        [[reply]] = engine.generate([ids], n=1, **sampling_kwargs(args, tokenizer))
        answer = tokenizer.decode(reply.token_ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        print(f"Assistant: {answer}", flush=True)
    if len(messages) > len(start):
        transcripts.append({"messages": messages})
    if args.out:
        write_jsonl(transcripts, args.out)


def main_generate(args: argparse.Namespace) -> int:
    import torch

    from align.generation.engine import GenerationEngine
    from align.generation.requests import build_request
    from align.models import DeepseekV2ForCausalLM

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {str(model_dir)!r}: not a directory")
    tokenizer = load_tokenizer(args.tokenizer or str(model_dir), args.chat_template)
    device = "cuda:0" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    model = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=args.dtype, device_map=device)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    build_request([[0]], model.config.vocab_size, n=args.n, **sampling_kwargs(args, tokenizer))  # fail early
    engine = GenerationEngine(model, max_batch=args.max_batch)
    if args.prompts and not args.interactive:
        run_batch(args, engine, tokenizer)
    else:
        run_chat(args, engine, tokenizer)
    return 0
