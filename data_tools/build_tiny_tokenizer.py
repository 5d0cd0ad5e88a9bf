"""Train the tiny byte-level BPE tokenizer used by tests and toy runs.

    python -m data_tools.build_tiny_tokenizer [--out DIR] [--vocab-size N]

The corpus is generated here from a fixed seed, so the output is reproducible. Digits are
always split one per token so that arithmetic stays learnable by a tiny model.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_tools.tokenizer import (
    BOS_TOKEN,
    DEEPSEEK_V2_CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    TINY_TOKENIZER_DIR,
)

VOCAB_SIZE = 1024

WORDS = (
    "the a an and or but if then so because of to in on at for with from by about as is are was were be "
    "been have has had do does did will would can could should may might must not no yes this that these "
    "those it its they them their we our you your he she his her i me my what which who when where why how "
    "number sum total answer question result value first second third last next step steps add subtract "
    "multiply divide plus minus times equals count more less than each every all some many few one two "
    "three four five six seven eight nine ten hundred thousand half twice apple apples book books box boxes "
    "cat dog bird tree house car train city river mountain day week year hour minute time people friend "
    "teacher student water money price cost buy sell give take make find think know say tell ask help "
    "write read code function return print list string true false none value error test input output "
    "model data train learn reward assistant user system please thank thanks hello sure here let us good "
    "bad right wrong correct check solve problem math story short long small large new old quick brown "
    "fox jumps over lazy"
).split()

TEMPLATES = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = {c}",
    "The answer is {c}.",
    "So {a} {op} {b} equals {c}.",
    "If you have {a} apples and get {b} more, you have {c} apples.",
)

CHAT_LINES = (
    "You are a helpful assistant.",
    "Let's think step by step.",
    "Sure, here is the answer.",
    "Please show your work and put the final answer at the end.",
    "def add(a, b):\n    return a + b\n",
    "print(sum([1, 2, 3]))",
    "Answer: {c}",
    "<think>{a} {op} {b} = {c}</think> {c}",
)


def arithmetic(rng: random.Random) -> dict[str, object]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"a": a, "b": b, "op": op, "c": c}


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(4, 14))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".?!,;:")


def chat_turn(rng: random.Random) -> str:
    values = arithmetic(rng)
    user = rng.choice(TEMPLATES).format(**values)
    reply = rng.choice(CHAT_LINES + TEMPLATES).format(**values)
    system = rng.choice(CHAT_LINES[:3]) + "\n\n" if rng.random() < 0.3 else ""
    return f"{system}User: {user}\n\nAssistant: {reply}"


def corpus(n_docs: int = 4000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.4:
            yield " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
        elif kind < 0.7:
            yield chat_turn(rng)
        else:
            yield "\n".join(rng.choice(TEMPLATES).format(**arithmetic(rng)) for _ in range(3))


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def build(out_dir: Path = TINY_TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=DEEPSEEK_V2_CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    portable_config(out_dir / "tokenizer_config.json")
    return tokenizer


def portable_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=TINY_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    tokenizer = build(args.out, args.vocab_size)
    print(f"saved {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
