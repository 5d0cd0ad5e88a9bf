"""ESFT in two CPU processes (gloo, DDP): the scoring pass is all-reduced, so both processes train the
experts one process would choose, with the same losses; a two-process resume is exact and reuses the
checkpoint's esft_experts.json. Launch and tolerances as tests/train/test_sft_multiprocess.py."""

from __future__ import annotations

import pytest

from align.train.esft import EXPERTS_FILE, read_choice
from tests.train.test_sft_multiprocess import RTOL, curve, one_process, two_processes

ESFT = ["lora=null", "esft.top_p=0.3", "esft.sample_tokens=800", "optim.lr=2e-2"]


def test_two_processes_choose_and_train_as_one(tmp_path):
    result = two_processes(tmp_path / "two", [*ESFT, "train.grad_accum=1", "train.save_every=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), ddp" in result.stdout
    one_process(tmp_path / "one", [*ESFT, "train.grad_accum=2"])
    two, one = read_choice(tmp_path / "two" / EXPERTS_FILE), read_choice(tmp_path / "one" / EXPERTS_FILE)
    assert two.layers == one.layers and (two.samples, two.tokens) == (one.samples, one.tokens)
    for layer, shares in one.scores["token"].items():
        assert two.scores["token"][layer] == pytest.approx(shares, abs=1e-6)
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), rel=RTOL)

    resumed = two_processes(tmp_path / "b", [*ESFT, f"resume_from={tmp_path / 'two/checkpoints/step-000002'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert (tmp_path / "b" / EXPERTS_FILE).read_text() == (tmp_path / "two" / EXPERTS_FILE).read_text()
    a, b = curve(tmp_path / "two"), curve(tmp_path / "b")
    assert sorted(b) == [3, 4]
    assert b == pytest.approx({k: a[k] for k in (3, 4)}, rel=1e-6)
