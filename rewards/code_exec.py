"""``code`` reward: run the completion's last Python code block against the row's tests.

The program is the last fenced block tagged ``python``/``py`` (else the last untagged
fence). The tests come from a column (``tests_column``, default ``tests``), in any of these
shapes, or a JSON string of one:

- a list of ``{"input": stdin, "output": expected stdout}`` (extra keys ignored);
- a list of assert-style strings (``"assert add(1, 2) == 3"``): each runs after the program;
- ``{"inputs": [...], "outputs": [...]}`` (APPS style) or one ``{"input", "output"}`` dict;
- one string: a single script run after the program.

A stdin/stdout test passes when the program exits 0 and its stdout equals the expected
output, compared line by line with trailing whitespace and trailing blank lines removed
(``exact_output: true`` compares bytes as text exactly). An assert test passes when the
program plus the asserts exit 0. Every test is one :func:`rewards.sandbox.run_python` call.

Params: ``tests_column`` (str, ``tests``), ``timeout_s`` (float, 5.0, wall per test),
``cpu_s`` (float, 5.0), ``memory_mb`` (int, 1024), ``max_tests`` (int | None: the first N),
``workers`` (int, 4: tests run in parallel threads, each in its own process),
``exact_output`` (bool, False), ``unsafe_no_isolation`` (bool, False; see below).

Isolation: every run is isolated by :mod:`rewards.sandbox` (own user, mount, pid and network
namespaces, unprivileged uid, no capabilities, read-only file system). When that cannot be set
up on the machine, building the reward and calling it raise
:class:`rewards.sandbox.SandboxUnavailable` naming the layer that failed. Only for completions
you trust, ``unsafe_no_isolation: true`` runs without the namespaces (resource limits and the
in-process audit hook only), with a warning.

Reward: passed / total tests; 0.0 without a code block; None for rows without tests.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rewards.registry import Scores, completion_text, register
from rewards.sandbox import SandboxLimits, SandboxUnavailable, require_isolation, run_python

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeTest:
    stdin: str = ""
    expected: str | None = None
    script: str = ""


def extract_code(text: str) -> str | None:
    """The last ```python (or ```py) block; else the last untagged ``` block; else None."""
    blocks = _FENCE.findall(text)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    chosen = tagged or untagged
    return chosen[-1] if chosen else None


def _one_test(item: Any) -> CodeTest:
    if isinstance(item, str):
        return CodeTest(script=item)
    if isinstance(item, Mapping) and "input" in item and "output" in item:
        return CodeTest(stdin=str(item["input"]), expected=str(item["output"]))
    raise ValueError(f"cannot read a test from {item!r}: need {{'input', 'output'}} or an assert string")


def parse_tests(value: Any) -> list[CodeTest]:
    """Tests of one row in any supported shape (see the module docstring)."""
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("[", "{"):
            try:
                return parse_tests(json.loads(stripped))
            except json.JSONDecodeError:
                pass
        return [CodeTest(script=value)] if stripped else []
    if isinstance(value, Mapping) and "inputs" in value and "outputs" in value:
        return [CodeTest(stdin=str(i), expected=str(o)) for i, o in zip(value["inputs"], value["outputs"], strict=True)]
    if isinstance(value, Mapping):
        return [_one_test(value)]
    return [_one_test(item) for item in value]


def _clean(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def run_test(
    program: str, test: CodeTest, limits: SandboxLimits, exact_output: bool = False, isolate: bool = True
) -> bool:
    """Whether ``program`` passes ``test`` in the sandbox (``isolate=False``: limits and hook only)."""
    code = program if test.expected is not None else f"{program}\n\n{test.script}\n"
    result = run_python(code, test.stdin, limits, isolate=isolate)
    if not result.passed:
        return False
    if test.expected is None:
        return True
    return result.stdout == test.expected if exact_output else _clean(result.stdout) == _clean(test.expected)


def _check(params: Mapping[str, Any]) -> None:
    for key in ("timeout_s", "cpu_s", "memory_mb", "workers"):
        if key in params and not params[key] > 0:
            raise ValueError(f"{key} must be > 0, got {params[key]!r}")
    if params.get("max_tests") is not None and params["max_tests"] < 1:
        raise ValueError("max_tests must be >= 1 or null")
    if not isinstance(params.get("unsafe_no_isolation", False), bool):
        raise ValueError(f"unsafe_no_isolation must be true or false, got {params['unsafe_no_isolation']!r}")
    if not params.get("unsafe_no_isolation", False):
        try:
            require_isolation()  # refuse at start-up, not at the first batch
        except SandboxUnavailable as exc:
            raise ValueError(str(exc)) from exc


class UnsafeSandboxWarning(RuntimeWarning):
    """The ``code`` reward runs untrusted programs without namespace isolation."""


@register("code", check=_check)
def code_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    tests_column: str = "tests",
    timeout_s: float = 5.0,
    cpu_s: float = 5.0,
    memory_mb: int = 1024,
    max_tests: int | None = None,
    workers: int = 4,
    exact_output: bool = False,
    unsafe_no_isolation: bool = False,
    **columns: Any,
) -> Scores:
    if unsafe_no_isolation:
        warnings.warn(
            "code reward: unsafe_no_isolation is set, so completions run WITHOUT namespace isolation "
            "(only resource limits and an in-process audit hook that native code can bypass)",
            UnsafeSandboxWarning,
            stacklevel=2,
        )
    else:
        require_isolation()
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
    rows = columns.get(tests_column, [None] * len(completions))
    jobs: list[tuple[int, str, CodeTest]] = []
    totals: list[int] = []
    for i, (completion, raw) in enumerate(zip(completions, rows, strict=True)):
        tests = parse_tests(raw)[:max_tests]
        program = extract_code(completion_text(completion)) if tests else None
        totals.append(len(tests))
        jobs += [(i, program, t) for t in tests] if program is not None else []
    passed = [0] * len(completions)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = pool.map(lambda job: run_test(job[1], job[2], limits, exact_output, not unsafe_no_isolation), jobs)
        for (i, _, _), ok in zip(jobs, outcomes, strict=True):
            passed[i] += int(ok)
    return [passed[i] / totals[i] if totals[i] else None for i in range(len(completions))]
