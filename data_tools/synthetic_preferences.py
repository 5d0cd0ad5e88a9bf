"""Preference pairs on the synthetic arithmetic task (data_tools.synthetic), for the tiny reward model.

Each row is TRL's explicit preference format plus two columns for analysis:
{"prompt": [user], "chosen": [assistant: the right answer], "rejected": [assistant: a wrong one],
 "wrong": "borrow" | "random" | "near" | "likeliest", "answer": "35"}. A share `borrow_share` of the pairs
(default half) reject the flawed SFT teacher's bug on a subtraction that needs a borrow (52 - 17 -> "45");
the others, on problems that need no borrow, reject any other number up to the largest answer
(`other_wrong: random`), a near miss (`near`: the right answer +-1, +-2, +-10 or +-11, never negative), or
a model's own likeliest mistake (`likeliest`: the caller passes `mistakes(problems) -> (wrong reply, its
probability) per problem`, e.g. from the SFT model the reward model starts from; the problems are drawn
without replacement in proportion to that probability, so the pairs are the near misses sampling from the
model makes, where it makes them, as RL from it will), or `mixed`: alternately likeliest and random.
Test and train pairs never share a problem, and the test pairs are the same whatever `n_train`.

    python -m data_tools.synthetic_preferences --out data/prefs --train 3000 --test 400
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from data_tools.jsonl import write_jsonl
from data_tools.synthetic import OPS, Problem, needs_borrow, solve

NEAR_MISSES = (1, -1, 2, -2, 10, -10, 11, -11)
OTHER_WRONG = ("random", "near", "likeliest", "mixed")

Mistakes = Callable[[list[Problem]], list[tuple[str, float]]]  # per problem: (a wrong reply, its probability)


def all_problems(max_operand: int, ops: str) -> list[Problem]:
    """Every distinct problem with operands 0..max_operand (subtraction never negative), in a fixed order."""
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops is {ops!r}; expected distinct characters from {OPS!r}")
    span = range(max_operand + 1)
    return [(a, op, b) for op in ops for a in span for b in span if op != "-" or a >= b]


def _reply(value: int) -> dict:
    return {"role": "assistant", "content": str(value)}


def _wrong(right: int, wrong: str, top: int, rng: random.Random) -> int:
    """A wrong answer: the borrow bug (+10), a near miss, or any other number 0..top."""
    if wrong == "borrow":
        return right + 10
    if wrong == "near":
        return rng.choice([right + d for d in NEAR_MISSES if right + d >= 0])
    bad = rng.randint(0, top - 1)
    return bad if bad < right else bad + 1  # uniform over 0..top without the right answer


def _pair(problem: Problem, wrong: str, rng: random.Random, top: int, bad: str | None = None) -> dict:
    a, op, b = problem
    right = solve(a, op, b)
    bad = str(_wrong(right, wrong, top, rng)) if bad is None else bad
    prompt = [{"role": "user", "content": f"What is {a} {op} {b}?"}]
    return {"prompt": prompt, "chosen": [_reply(right)], "rejected": [{"role": "assistant", "content": bad}],
            "wrong": wrong, "answer": str(right)}


def _split_counts(n: int, share: float) -> tuple[int, int]:
    borrow = round(n * share)
    return borrow, n - borrow


def preference_splits(n_train: int, n_test: int, seed: int, *, max_operand: int = 99, ops: str = "+-",
                      borrow_share: float = 0.5, other_wrong: str = "random",
                      mistakes: Mistakes | None = None) -> tuple[list[dict], list[dict]]:
    """(train, test) preference rows, one problem per pair, no problem in both splits (seeded). other_wrong:
    the wrong reply of the pairs that are not borrow bugs, 'random' (any other number up to the largest
    answer), 'near' (a near miss), 'likeliest' (the reply `mistakes` gives, required then) or 'mixed' (every
    other pair 'likeliest', the rest 'random', on the problems 'likeliest' draws)."""
    if not 0.0 <= borrow_share <= 1.0:
        raise ValueError(f"borrow_share must be in [0, 1], got {borrow_share}")
    if other_wrong not in OTHER_WRONG:
        raise ValueError(f"other_wrong is {other_wrong!r}; expected one of {', '.join(OTHER_WRONG)}")
    if other_wrong in ("likeliest", "mixed") and mistakes is None:
        raise ValueError("other_wrong 'likeliest' needs `mistakes` (the model whose mistakes are rejected)")
    rng = random.Random(f"preferences:{seed}")
    problems = all_problems(max_operand, ops)
    rng.shuffle(problems)
    borrow = [p for p in problems if needs_borrow(*p)]
    near = [p for p in problems if not needs_borrow(*p)]
    (test_b, test_n), (train_b, train_n) = _split_counts(n_test, borrow_share), _split_counts(n_train, borrow_share)
    if test_b + train_b > len(borrow) or test_n + train_n > len(near):
        raise ValueError(
            f"asked for {test_b + train_b} borrow pairs and {test_n + train_n} near-miss pairs, but operands "
            f"0..{max_operand} with ops {ops!r} give {len(borrow)} borrowing subtractions and {len(near)} other "
            f"problems; lower train / test or raise max_operand")
    top = max(solve(*p) for p in problems)
    wrong = {}
    if other_wrong in ("likeliest", "mixed"):  # weighted draw without replacement (Efraimidis-Spirakis keys u^(1/p))
        found = dict(zip(near, mistakes(near), strict=True))
        draw = random.Random(f"likeliest:{seed}")
        keys = {p: math.log(draw.random() or 1e-300) / max(found[p][1], 1e-12) for p in near}
        near = sorted(near, key=keys.__getitem__, reverse=True)
        wrong = {p: found[p][0] for p in near[: test_n + train_n]}

    def others(part: list[Problem]) -> list[dict]:
        if other_wrong != "mixed":
            return [_pair(p, other_wrong, rng, top, wrong.get(p)) for p in part]
        return [_pair(p, "likeliest", rng, top, wrong[p]) if i % 2 == 0 else _pair(p, "random", rng, top)
                for i, p in enumerate(part)]

    test = [_pair(p, "borrow", rng, top) for p in borrow[:test_b]] + others(near[:test_n])
    rng.shuffle(test)  # before any train draw: the test pairs do not depend on n_train
    train = ([_pair(p, "borrow", rng, top) for p in borrow[test_b : test_b + train_b]]
             + others(near[test_n : test_n + train_n]))
    rng.shuffle(train)
    return train, test


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthetic_preferences",
                                     description="Write train.jsonl / test.jsonl of arithmetic preference pairs.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=3000, help="training pairs (default 3000)")
    parser.add_argument("--test", type=int, default=400, help="held-out pairs (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=99)
    parser.add_argument("--ops", default="+-")
    parser.add_argument("--borrow-share", type=float, default=0.5, help="share of pairs rejecting the borrow bug")
    parser.add_argument("--other-wrong", default="random", choices=OTHER_WRONG[:2],
                        help="the other pairs' wrong reply (likeliest / mixed need a model: `align rm`)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        train, test = preference_splits(args.train, args.test, args.seed, max_operand=args.max_operand,
                                        ops=args.ops, borrow_share=args.borrow_share,
                                        other_wrong=args.other_wrong)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    write_jsonl(train, Path(args.out) / "train.jsonl")
    write_jsonl(test, Path(args.out) / "test.jsonl")
    print(f"wrote {len(train)} pairs to {args.out}/train.jsonl and {len(test)} to {args.out}/test.jsonl")


if __name__ == "__main__":
    main()
