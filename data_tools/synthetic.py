"""Deterministic synthetic arithmetic chat data for the tiny default model (SFT and RL).

Each row: {"messages": [user, assistant], "prompt": [user], "answer": "68"} - `messages` for SFT,
`prompt` + `answer` for RL. Problems are distinct within a call; subtraction never goes negative.

`teacher_error` makes the training replies come from a flawed teacher: that share of the
replies to subtractions that need a borrow (units digit of a < units digit of b) is the answer of
someone who forgot to borrow (a - b + 10, e.g. 52 - 17 -> "45"). With `replies_per_problem` > 1
each training problem is asked several times and the teacher errs independently each time, so the
bug is a per-problem probability, not a per-problem label a model could memorise. The `answer`
column is always right and test rows are always right, so a model that imitates the teacher
learns the bug, and RL with a verifiable reward on `answer` can unlearn it: the embedded
SFT -> RL default is built on that.

    python -m data_tools.synthetic --out data/arith --train 10000 --test 500 --seed 0
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from data_tools.jsonl import write_jsonl

OPS = "+-*"

Problem = tuple[int, str, int]


def problem_count(max_operand: int, ops: str) -> int:
    """How many distinct problems exist with operands 0..max_operand."""
    size = max_operand + 1
    return sum(size * (size + 1) // 2 if op == "-" else size * size for op in set(ops))


def _check(n: int, max_operand: int, ops: str) -> None:
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops is {ops!r}; expected distinct characters from {OPS!r}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be at least 1, got {max_operand}")
    if not 0 <= n <= problem_count(max_operand, ops):
        raise ValueError(
            f"asked for {n} problems but only {problem_count(max_operand, ops)} distinct ones exist "
            f"with operands 0..{max_operand} and ops {ops!r}; raise max_operand or add ops"
        )


def _draw(rng: random.Random, max_operand: int, ops: str) -> Problem:
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def _problems(n: int, seed: int, max_operand: int, ops: str) -> list[Problem]:
    _check(n, max_operand, ops)
    rng = random.Random(f"arithmetic:{seed}")
    seen: set[Problem] = set()
    out: list[Problem] = []
    while len(out) < n:
        problem = _draw(rng, max_operand, ops)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def needs_borrow(a: int, op: str, b: int) -> bool:
    return op == "-" and a % 10 < b % 10


def make_row(a: int, op: str, b: int, forget_borrow: bool = False) -> dict[str, object]:
    """A chat row; with forget_borrow (only meaningful when needs_borrow) the reply is a - b + 10."""
    question = {"role": "user", "content": f"What is {a} {op} {b}?"}
    answer = str(solve(a, op, b))
    reply = str(solve(a, op, b) + 10) if forget_borrow and needs_borrow(a, op, b) else answer
    return {"messages": [question, {"role": "assistant", "content": reply}], "prompt": [question],
            "answer": answer}


def arithmetic_rows(n: int, seed: int, *, max_operand: int = 99, ops: str = "+-") -> list[dict]:
    """n distinct problems, the same for the same arguments. A larger n extends a smaller one:
    arithmetic_rows(k, s) == arithmetic_rows(n, s)[:k] for k <= n."""
    return [make_row(*problem) for problem in _problems(n, seed, max_operand, ops)]


def arithmetic_splits(
    n_train: int, n_test: int, seed: int, *, max_operand: int = 99, ops: str = "+-", teacher_error: float = 0.0,
    replies_per_problem: int = 1,
) -> tuple[list[dict], list[dict]]:
    """(train, test) with no problem in both; test is the same whatever n_train. n_train counts training
    problems; each gets replies_per_problem rows (adjacent), each with its own teacher draw: with
    teacher_error, that share of the replies to subtractions needing a borrow forget the borrow (seeded)."""
    if not 0.0 <= teacher_error <= 1.0:
        raise ValueError(f"teacher_error must be in [0, 1], got {teacher_error}")
    if replies_per_problem < 1:
        raise ValueError(f"replies_per_problem must be at least 1, got {replies_per_problem}")
    problems = _problems(n_test + n_train, seed, max_operand, ops)
    rng = random.Random(f"teacher:{seed}")
    train = [make_row(*p, forget_borrow=rng.random() < teacher_error)
             for p in problems[n_test:] for _ in range(replies_per_problem)]
    return train, [make_row(*p) for p in problems[:n_test]]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synthetic",
        description="Write train.jsonl / test.jsonl of synthetic arithmetic chats (disjoint problems).",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=10000, help="training rows (default 10000)")
    parser.add_argument("--test", type=int, default=500, help="held-out rows (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=99, help="operands are 0..N (default 99)")
    parser.add_argument("--ops", default="+-", help=f"operators, from {OPS!r} (default '+-')")
    parser.add_argument("--teacher-error", type=float, default=0.0,
                        help="share of borrowing subtractions whose training reply forgets the borrow (default 0)")
    parser.add_argument("--replies-per-problem", type=int, default=1,
                        help="training rows per problem, each with its own teacher draw (default 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        train, test = arithmetic_splits(args.train, args.test, args.seed, max_operand=args.max_operand,
                                        ops=args.ops, teacher_error=args.teacher_error,
                                        replies_per_problem=args.replies_per_problem)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    print(f"wrote {len(train)} rows to {out / 'train.jsonl'} and {len(test)} to {out / 'test.jsonl'}")


if __name__ == "__main__":
    main()
