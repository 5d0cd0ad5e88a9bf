import pytest

from rewards import RewardConfigError, build_rewards
from rewards.accuracy import exact_match_reward, math_reward
from rewards.extract import after_marker, extract_answer, last_boxed, last_number, last_number_matches, normalize


@pytest.fixture
def math_verify():
    return pytest.importorskip("math_verify")


def test_math_equivalence(math_verify):
    completions = [
        "so the result is \\boxed{\\frac{1}{2}}",
        "I get \\boxed{\\frac{1}{3}}",
        [{"role": "assistant", "content": "Therefore $x = \\boxed{0.5}$."}],
        "no idea",
    ]
    scores = math_reward(["q"] * 4, completions, answer=["0.5", "0.5", "\\frac{1}{2}", "0.5"])
    assert scores == [1.0, 0.0, 1.0, 0.0]


def test_math_gold_from_solution_and_unparsable_gold(math_verify):
    solution = ["We expand and get $\\boxed{x^2+2x}$.", "", "no math here at all"]
    scores = math_reward(["q"] * 3, ["\\boxed{x(x+2)}"] * 3, solution=solution)
    assert scores == [1.0, None, None]


def test_math_needs_a_reference_column(math_verify):
    with pytest.raises(KeyError, match="answer"):
        math_reward(["q"], ["\\boxed{1}"], other=["1"])


def test_extract_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_number("cost 1,234.50 then -7 apples") == "-7"
    assert last_number("no digits") is None
    assert after_marker("work\n#### 72\n") == "72"
    assert after_marker("The answer is: 42.") == "42"
    assert extract_answer("<answer> yes </answer>", "answer_tag") == "yes"
    assert normalize(" $1,234$ ") == "1234"
    assert normalize("Paris", case_sensitive=True) == "Paris"


@pytest.mark.parametrize(
    ("completion", "answer", "params", "expected"),
    [
        ("so 1,234 apples", "1234", {}, 1.0),
        ("it is 5.0", "5", {}, 1.0),
        ("it is 5.0", "5", {"numeric": False}, 0.0),
        ("first 3 then \\boxed{12}", "12", {"extract": "boxed"}, 1.0),
        ("first 3 then \\boxed{12}", "3", {"extract": "boxed"}, 0.0),
        ("reasoning 7\n#### 72", "72", {"extract": "marker"}, 1.0),
        ("The answer is Paris.", "paris", {"extract": "marker"}, 1.0),
        ("The answer is Paris.", "paris", {"extract": "marker", "case_sensitive": True}, 0.0),
        ("  Hello   World ", "hello world", {"extract": "whole"}, 1.0),
        ("no number here", "4", {}, 0.0),
        ("<answer>B</answer>", "b", {"extract": "answer_tag"}, 1.0),
    ],
)
def test_exact_match(completion, answer, params, expected):
    assert exact_match_reward(["q"], [completion], answer=[answer], **params) == [expected]


# (reply, answer, match): the rule the greedy exact-match eval and the exact_match reward's defaults share
LAST_NUMBER_CASES = [
    ("68", "68", True), (" 68\n", "68", True), ("68.", "68", True), ("The answer is 68, surely", "68", True),
    ("-5", "-5", True), ("+7", "7", True), ("68.0", "68", True), ("1,234", "1234", True),
    ("12 then 13\n68", "68", True), ("68\nmore text 70", "68", False),  # the last number counts
    ("680", "68", False), ("6 8", "68", False), ("no number", "68", False), ("", "", False), ("   ", "68", False),
]


@pytest.mark.parametrize(("reply", "answer", "match"), LAST_NUMBER_CASES)
def test_last_number_matches_is_the_exact_match_reward_default(reply, answer, match):
    assert last_number_matches(reply, answer) is match
    assert exact_match_reward(["q"], [reply], answer=[answer]) == [None if not answer.strip() else float(match)]


def test_exact_match_gold_extraction_and_missing_gold():
    gold = ["Natalia sold 48/2 = 24 clips.\n#### 72", None]
    scores = exact_match_reward(["q", "q"], ["72", "72"], answer=gold, gold_extract="marker")
    assert scores == [1.0, None]


def test_exact_match_custom_markers_and_column():
    [reward] = build_rewards(
        [{"name": "exact_match", "params": {"extract": "marker", "markers": ["ANSWER:"], "answer_column": "gold"}}]
    )
    assert reward(["q"], ["ANSWER: 9"], gold=["9"]) == [1.0]
    with pytest.raises(RewardConfigError, match="markers"):
        build_rewards([{"name": "exact_match", "params": {"markers": "####"}}])
