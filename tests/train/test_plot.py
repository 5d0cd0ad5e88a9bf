"""`align plot`: the router panel of an MoE RL run."""

from __future__ import annotations

import json

import pytest

from align.train.plot import plot_run


def test_router_panel(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": s, "train/loss": 1.0 / s, "moe/routing_agreement": 0.99, "moe/load_max_over_mean": 2.0,
                "moe/load_max_over_mean/layer_1": 2.0, "moe/load_max_over_mean/layer_2": 1.5,
                "moe/load_entropy/layer_1": 0.9, "moe/load_entropy/layer_2": 0.95, "moe/load_entropy": 0.9}
               for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    names = {p.name for p in plot_run(tmp_path)}
    assert names == {"loss.png", "router.png"}  # the router keys are drawn in the panel only
    assert (tmp_path / "plots" / "router.png").stat().st_size > 1000
