"""The GRPO update in length order (grpo.update(by_length=True), the CUDA default) is the same step."""

from __future__ import annotations

import pytest
import torch

from align.models import build_model
from align.recipe import GRPOSection
from align.train.grpo import update
from align.train.optim import build_optimizer, build_scheduler
from align.train.rollout_batch import make_batch
from align.train.setup import FullSetup


def ragged_batch(rows: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=gen))  # noqa: E731
    prompts = [[0, *torch.randint(2, 1000, (draw(2, 9),), generator=gen).tolist()] for _ in range(rows)]
    completions = [torch.randint(2, 1000, (draw(1, 24),), generator=gen).tolist() for _ in range(rows)]
    return make_batch(prompts, completions, torch.randn(rows, generator=gen), 1)


def stepped(by_length: bool, loss_type: str, batch):
    from accelerate import Accelerator

    model = build_model("tiny", seed=4, dtype=torch.float64)
    optimizer = build_optimizer(model, lr=1e-3)
    setup = FullSetup(model.train(), optimizer, build_scheduler(optimizer, "constant", 4), "single",
                      Accelerator(cpu=True), None)
    g = GRPOSection(loss_type=loss_type, micro_batch_size=4, beta=0.0)  # one step: from equal weights
    metrics, _ = update(setup, batch, g, max_grad_norm=1.0, by_length=by_length)
    return model, metrics


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_length_order_gives_the_same_step_and_metrics(loss_type):
    plain, plain_metrics = stepped(False, loss_type, ragged_batch())
    ordered, metrics = stepped(True, loss_type, ragged_batch())
    start = build_model("tiny", seed=4, dtype=torch.float64)
    moved = max((a - s).abs().max().item() for a, s in zip(plain.parameters(), start.parameters(), strict=True))
    assert moved > 1e-4  # the steps moved the weights by far more than the tolerance below
    for a, b in zip(plain.parameters(), ordered.parameters(), strict=True):
        # sums in another order; the router's scores are float32 (1e-7 relative), through Adam's m / sqrt(v)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == plain_metrics.keys()
    for key, value in plain_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key


def test_by_length_sorts_every_field_alike_and_pads_less():
    batch = ragged_batch()
    batch.routing = torch.arange(len(batch))[:, None, None, None].expand(-1, batch.input_ids.shape[1], 2, 3).clone()
    ordered = batch.by_length()
    lengths = batch.prompt_lens + batch.token_mask.sum(-1).long()
    order = torch.argsort(lengths, stable=True)
    assert torch.equal(ordered.routing[:, 0, 0, 0], order)  # the routing moved with its row
    for name in ("input_ids", "completion_ids", "token_mask", "loss_mask", "advantages", "prompt_lens"):
        assert torch.equal(getattr(ordered, name), getattr(batch, name)[order]), name
    padded = lambda b: sum(p.input_ids.numel() for p in (b.rows(s, s + 4) for s in range(0, len(b), 4)))  # noqa: E731
    assert padded(ordered) < padded(batch)


def test_length_order_is_on_only_where_the_step_stays_the_same():
    from align.train.grpo import order_free

    assert order_free(GRPOSection(loss_type="dapo", micro_batch_size=5), 12)
    assert order_free(GRPOSection(loss_type="grpo", micro_batch_size=4), 12)
    assert not order_free(GRPOSection(loss_type="grpo", micro_batch_size=5), 12)  # a short last micro-batch
    assert not order_free(GRPOSection(loss_type="bnpo", micro_batch_size=4), 12)
