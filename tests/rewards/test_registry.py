import logging
import math
import textwrap

import pytest

import rewards
from rewards import RewardConfigError, WeightedReward, build_rewards, completion_text, score


def _const(value):
    return lambda prompts, completions, **kw: [value] * len(completions)


def test_builds_by_name_with_defaults():
    built = build_rewards(["format", {"name": "exact_match", "weight": 0.5, "params": {"extract": "boxed"}}])
    assert [(r.name, r.weight) for r in built] == [("format", 1.0), ("exact_match", 0.5)]
    assert built[1].params == {"extract": "boxed"}


def test_builtins_are_registered():
    expected = {"math", "exact_match", "format", "length_penalty", "reasoning_gym", "code", "reward_model"}
    assert expected <= set(rewards.registered())


def test_typo_suggests_closest_name_and_lists_valid_ones():
    with pytest.raises(RewardConfigError) as err:
        build_rewards([{"name": "exact_mach"}])
    message = str(err.value)
    assert "Did you mean 'exact_match'" in message
    assert "math" in message and "rewards[0]" in message


def test_unknown_param_is_named():
    with pytest.raises(RewardConfigError, match="unknown param 'extrct'.*Did you mean 'extract'"):
        build_rewards([{"name": "exact_match", "params": {"extrct": "boxed"}}])


def test_missing_required_param():
    with pytest.raises(RewardConfigError, match="missing required param.*target"):
        build_rewards([{"name": "length_penalty", "params": {"max_length": 10}}])


def test_flat_params_are_rejected_with_a_hint():
    with pytest.raises(RewardConfigError, match="'extract'.*under 'params'"):
        build_rewards([{"name": "exact_match", "extract": "boxed"}])


@pytest.mark.parametrize("weight", ["1", True, float("nan")])
def test_bad_weight(weight):
    with pytest.raises(RewardConfigError, match="weight"):
        build_rewards([{"name": "format", "weight": weight}])


def test_param_values_are_checked_at_build_time():
    with pytest.raises(RewardConfigError, match="extract='bogus'"):
        build_rewards([{"name": "exact_match", "params": {"extract": "bogus"}}])


def test_duplicate_names_need_a_label():
    with pytest.raises(RewardConfigError, match="label"):
        build_rewards(["format", "format"])
    built = build_rewards(["format", {"name": "format", "label": "format_strict", "params": {"mode": "search"}}])
    assert [r.name for r in built] == ["format", "format_strict"]


def test_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def bonus(prompts, completions, *, amount=1.0, **columns):
                return [amount * len(c) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    [reward] = build_rewards([{"name": "my_rewards:bonus", "params": {"amount": 2.0}}])
    assert reward(["p"], ["abc"]) == [6.0]
    with pytest.raises(RewardConfigError, match="unknown param 'amt'"):
        build_rewards([{"name": "my_rewards:bonus", "params": {"amt": 2.0}}])
    with pytest.raises(RewardConfigError, match="has no attribute 'nope'"):
        build_rewards(["my_rewards:nope"])


def test_module_function_import_error_is_clear():
    with pytest.raises(RewardConfigError, match="cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"):
        build_rewards(["no_such_module_xyz:reward"])
    with pytest.raises(RewardConfigError, match="package.module:function"):
        build_rewards([":reward"])


def test_completion_text_handles_strings_and_messages():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert completion_text(parts) == "ab"


def test_score_weighted_sum_skips_none():
    half = WeightedReward("half", _const(1.0), weight=0.5)
    maybe = WeightedReward("maybe", lambda prompts, completions, **kw: [None, 2.0], weight=2.0)
    total, per_function, errors = score([half, maybe], ["p", "q"], ["a", "b"])
    assert total == [0.5, 4.5]
    assert per_function == {"half": [1.0, 1.0], "maybe": [None, 2.0]}
    assert errors == {"half": 0, "maybe": 0}


def test_all_none_row_is_unscorable_nan():
    """TRL's rule: a row every reward returned None for is NaN (advantage 0), not 0.0."""
    maybe = WeightedReward("maybe", lambda prompts, completions, **kw: [None, 2.0])
    total, _, _ = score([WeightedReward("none", _const(None)), maybe], ["p", "q"], ["a", "b"])
    assert math.isnan(total[0]) and total[1] == 2.0


def test_raising_reward_is_logged_counted_and_others_continue(caplog):
    def boom(prompts, completions, **kw):
        raise RuntimeError("kaput")

    batch = [WeightedReward("boom", boom), WeightedReward("one", _const(1.0))]
    with caplog.at_level(logging.WARNING, logger="rewards.registry"):
        total, per_function, errors = score(batch, ["p", "q"], ["a", "b"])
        total2, _, errors2 = score(batch, ["p"], ["a"])
    assert per_function["boom"] == [None, None] and errors["boom"] == 1
    assert total == [1.0, 1.0] and total2 == [1.0] and errors2["boom"] == 1
    assert "RuntimeError: kaput" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("bad", [lambda p, c, **kw: [1.0], lambda p, c, **kw: ["x"] * len(c)])
def test_malformed_output_counts_as_error(bad):
    total, per_function, errors = score([WeightedReward("bad", bad)], ["p", "q"], ["a", "b"])
    assert errors == {"bad": 1} and per_function["bad"] == [None, None] and all(map(math.isnan, total))


def test_columns_reach_rewards_and_params_win():
    seen = {}

    def spy(prompts, completions, *, answer_column="answer", **columns):
        seen.update(columns, answer_column=answer_column)
        return [0.0] * len(completions)

    reward = WeightedReward("spy", spy, params={"answer_column": "gold"})
    score([reward], ["p"], ["a"], {"gold": ["1"], "completion_ids": [[1, 2]]})
    assert seen == {"gold": ["1"], "completion_ids": [[1, 2]], "answer_column": "gold"}


def test_trl_adapter_and_metrics():
    built = build_rewards([{"name": "format", "weight": 2.0}])
    funcs, weights = rewards.trl_reward_funcs(built)
    assert funcs[0].__name__ == "format" and weights == [2.0]
    assert funcs[0](prompts=["p"], completions=["<think>x</think><answer>y</answer>"], completion_ids=[[1]]) == [1.0]
    metrics = rewards.reward_metrics({"f": [1.0, None, 0.0], "g": [None, None, 2.0]}, {"f": 1}, [1.0, math.nan, 2.0])
    assert metrics == pytest.approx({
        "rewards/f/mean": 0.5, "rewards/f/std": math.sqrt(0.5), "rewards/f/errors": 1.0,
        "rewards/g/mean": 2.0, "rewards/g/std": math.nan, "rewards/g/errors": 0.0,
        "reward/mean": 1.5, "reward/std": math.sqrt(0.5),  # the unscorable row is left out, as TRL does
    }, nan_ok=True)
