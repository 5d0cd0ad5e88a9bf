import json

import pytest

from rewards import RewardConfigError, build_rewards
from rewards.code_exec import CodeTest, code_reward, extract_code, parse_tests

FAST = {"timeout_s": 3.0, "cpu_s": 1, "memory_mb": 256, "workers": 2}
ADDER = "Here you go:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
ECHO_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]


def test_extract_code_prefers_last_python_block():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\nfinally\n```py\nprint(3)\n```"
    assert extract_code(text) == "print(3)\n"
    assert extract_code("```\nprint(2)\n```") == "print(2)\n"
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("print(1)") is None


def test_parse_tests_shapes():
    io = [CodeTest(stdin="1", expected="2")]
    assert parse_tests([{"input": "1", "output": "2", "type": "stdin"}]) == io
    assert parse_tests({"inputs": ["1"], "outputs": ["2"]}) == io
    assert parse_tests(json.dumps({"inputs": ["1"], "outputs": ["2"]})) == io
    assert parse_tests(["assert f(1) == 2"]) == [CodeTest(script="assert f(1) == 2")]
    assert parse_tests("assert f(1) == 2") == [CodeTest(script="assert f(1) == 2")]
    assert parse_tests(None) == [] and parse_tests("  ") == []
    with pytest.raises(ValueError, match="cannot read a test"):
        parse_tests([{"stdin": "1"}])


def test_stdin_stdout_tests():
    wrong = ADDER.replace("a + b", "a * b")
    scores = code_reward(["p"] * 3, [ADDER, wrong, "no code at all"], tests=[ECHO_TESTS] * 3, **FAST)
    assert scores == [1.0, 0.0, 0.0]


def test_assert_tests_give_the_fraction_passed():
    program = [{"role": "assistant", "content": "```python\ndef sq(x):\n    return x * x if x < 3 else 0\n```"}]
    tests = ["assert sq(1) == 1", "assert sq(2) == 4", "assert sq(3) == 9", "assert sq(4) == 16"]
    assert code_reward(["p"], [program], tests=[tests], **FAST) == [0.5]


def test_rows_without_tests_are_none_and_max_tests():
    scores = code_reward(
        ["p"] * 2, [ADDER, ADDER], tests=[None, ECHO_TESTS[:1] + [{"input": "1 1", "output": "9"}]], max_tests=1, **FAST
    )
    assert scores == [None, 1.0]


def test_hostile_program_fails_its_tests_quickly():
    hang = "```python\nwhile True:\n    pass\n```"
    spawn = "```python\nimport os\nos.system('echo 3')\n```"
    scores = code_reward(["p"] * 2, [hang, spawn], tests=[ECHO_TESTS[:1]] * 2, **FAST)
    assert scores == [0.0, 0.0]


def test_bad_params_fail_at_build_time():
    with pytest.raises(RewardConfigError, match="timeout_s"):
        build_rewards([{"name": "code", "params": {"timeout_s": 0}}])
