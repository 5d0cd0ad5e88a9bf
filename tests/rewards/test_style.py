import pytest

from rewards import RewardConfigError, build_rewards, score
from rewards.style import format_reward, length_penalty_reward, linear_length_penalty

GOOD = "<think>\nstep 1\n</think>\n<answer>42</answer>\n"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.0),
        ("<think>x</think>", 0.0),
        ("<answer>42</answer>", 0.0),
        (GOOD + "trailing", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
        ("<think>a<think>b</think><answer>c</answer>", 0.0),
    ],
)
def test_format_default_tags(completion, expected):
    assert format_reward(["p"], [completion]) == [expected]


def test_format_modes_prefix_and_custom_pattern():
    text = "Sure. <answer>1</answer> bye"
    assert format_reward(["p"], [text], tags=["answer"]) == [0.0]
    assert format_reward(["p"], [text], tags=["answer"], mode="search") == [1.0]
    assert format_reward(["p"], ["x</think><answer>1</answer>"], prefix="<think>") == [1.0]
    assert format_reward(["p"], ["Final: 12", "final: 12"], pattern=r"Final: \d+") == [1.0, 0.0]
    assert format_reward(["p"], ["final: 12"], pattern=r"Final: \d+", ignore_case=True) == [1.0]
    conversational = [[{"role": "assistant", "content": GOOD}]]
    assert format_reward(["p"], conversational) == [1.0]


@pytest.mark.parametrize(
    "params",
    [{"pattern": "(", "tags": None}, {"pattern": "a", "tags": ["b"]}, {"mode": "prefix"}, {"tags": "think"}],
)
def test_format_bad_params(params):
    with pytest.raises(RewardConfigError):
        build_rewards([{"name": "format", "params": params}])


def test_length_formula():
    assert linear_length_penalty(50, target=100, max_length=200) == 0.0
    assert linear_length_penalty(100, target=100, max_length=200) == 0.0
    assert linear_length_penalty(150, target=100, max_length=200, scale=2.0) == -1.0
    assert linear_length_penalty(200, target=100, max_length=200) == -1.0
    assert linear_length_penalty(10_000, target=100, max_length=200) == -1.0


def test_length_units():
    ids = [[0] * 5, [0] * 15, [0] * 30]
    assert length_penalty_reward([""] * 3, ["", "", ""], target=10, max_length=20, completion_ids=ids) == [
        0.0,
        -0.5,
        -1.0,
    ]
    assert length_penalty_reward(["p"], ["a" * 15], target=10, max_length=20, unit="chars") == [-0.5]
    assert length_penalty_reward(["p"], ["w " * 15], target=10, max_length=20, unit="words", scale=0.2) == [-0.1]


def test_length_tokens_without_ids_is_a_counted_error():
    built = build_rewards([{"name": "length_penalty", "params": {"target": 1, "max_length": 2}}])
    _, per_function, errors = score(built, ["p"], ["abc"])
    assert errors == {"length_penalty": 1} and per_function["length_penalty"] == [None]


@pytest.mark.parametrize(
    "params",
    [{"target": 10, "max_length": 10}, {"target": -1, "max_length": 5}, {"target": 1, "max_length": 5, "unit": "x"}],
)
def test_length_bad_params(params):
    with pytest.raises(RewardConfigError):
        build_rewards([{"name": "length_penalty", "params": params}])
