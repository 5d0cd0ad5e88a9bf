import json

import pytest

import rewards.gym as gym
from rewards.gym import reasoning_gym_reward


class StubTask:
    def __init__(self):
        self.calls = []

    def score_answer(self, answer, entry):
        self.calls.append((answer, entry))
        if answer == "explode":
            raise ValueError("bad answer")
        return 1.0 if answer == entry["answer"] else 0.0


@pytest.fixture
def stub(monkeypatch):
    task = StubTask()
    monkeypatch.setattr(gym, "score_fn_for", lambda name: task.score_answer)
    return task


def test_adapter_passes_entry_and_extracts_answer_tag(stub):
    meta = {"source_dataset": "stub_task", "n": 3}
    completions = ["<think>..</think><answer>7</answer>", "<answer>8</answer>", "no tag"]
    scores = reasoning_gym_reward(["Q?"] * 3, completions, answer=["7"] * 3, metadata=[meta, json.dumps(meta), meta])
    assert scores == [1.0, 0.0, 0.0]
    answer, entry = stub.calls[0]
    assert answer == "7" and entry == {"question": "Q?", "answer": "7", "metadata": meta}
    assert stub.calls[2][0] is None


def test_rows_without_task_or_failing_scorer_are_none(stub):
    scores = reasoning_gym_reward(
        ["q"] * 3,
        ["<answer>1</answer>", "<answer>explode</answer>", "<answer>1</answer>"],
        answer=["1", "1", "1"],
        metadata=[{}, {"source_dataset": "stub"}, None],
    )
    assert scores == [None, None, None]


def test_task_column_and_extract_mode(stub):
    scores = reasoning_gym_reward(
        ["q"], ["result: 5"], answer=["5"], task=["t"], task_column="task", extract="last_number"
    )
    assert scores == [1.0]


def test_real_reasoning_gym_task():
    rg = pytest.importorskip("reasoning_gym")
    entry = rg.create_dataset("leg_counting", size=1, seed=7)[0]
    right, wrong = f"<answer>{entry['answer']}</answer>", "<answer>-1</answer>"
    scores = reasoning_gym_reward(
        [entry["question"]] * 2, [right, wrong], answer=[entry["answer"]] * 2, metadata=[entry["metadata"]] * 2
    )
    assert scores[0] == 1.0 and scores[1] < 1.0
