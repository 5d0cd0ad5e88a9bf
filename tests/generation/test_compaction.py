"""The straggler tail: once nothing is queued, the decode step narrows to the live rows (compacted into the
lowest slots). Compaction moves rows, it never changes what they compute."""

from __future__ import annotations

import pytest
import torch

from align.generation import GenerationEngine
from align.models import build_model

PROMPTS = [[0, 11, 12, 13, 14], [0, 40], [0, 7, 8, 9, 10, 11, 12], [5], [0, 3, 4], [0, 90, 91, 92]] * 3
STOPS = list(range(0, 256, 9))  # many stop ids: rows end at very different steps


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=3).eval()


def run(model, compact: bool, **kwargs):
    engine = GenerationEngine(model, max_batch=32, refill_every=2, compact=compact)
    widths = []
    step = engine.run_step

    def spy(*args):
        widths.append(engine.width)
        step(*args)

    engine.run_step = spy
    results = engine.generate(PROMPTS, max_new_tokens=24, stop_token_ids=STOPS, **kwargs)
    return results, widths, engine


def test_widths_halve_to_eight(tiny):
    engine = GenerationEngine(tiny, max_batch=256)
    engine.generate([[0, 1]], max_new_tokens=1, n=256, temperature=0)
    assert engine.widths() == [256, 128, 64, 32, 16, 8]
    engine.generate([[0, 1]], max_new_tokens=1, n=100, temperature=0)
    assert engine.widths() == [100, 56, 32, 16, 8]


def test_greedy_unchanged_by_compaction(tiny):
    plain, plain_widths, _ = run(tiny, False, temperature=0, record_routing=True, n=2)
    packed, widths, engine = run(tiny, True, temperature=0, record_routing=True, n=2)
    assert set(plain_widths) == {32}
    assert widths[0] == 32 and min(widths) < 32 and widths == sorted(widths, reverse=True)
    lengths = [len(c.token_ids) for row in plain for c in row]
    assert min(lengths) < 12 and max(lengths) == 24  # a real tail
    for row_a, row_b in zip(plain, packed, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
            assert torch.equal(a.routing, b.routing)
    again, _, _ = run(tiny, True, temperature=0, n=2)  # a second call starts at full width again
    assert [[c.token_ids for c in r] for r in again] == [[c.token_ids for c in r] for r in packed]


def test_sampled_groups_complete_and_seeded(tiny):
    first, widths, _ = run(tiny, True, temperature=1.0, n=4, seed=7)
    second, _, _ = run(tiny, True, temperature=1.0, n=4, seed=7)
    assert min(widths) < 32
    assert all(len(row) == 4 and all(c is not None and c.token_ids for c in row) for row in first)
    assert [[c.token_ids for c in r] for r in first] == [[c.token_ids for c in r] for r in second]
    for row in first:
        for c in row:
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            stopped = c.token_ids[-1] in STOPS
            assert c.finish_reason == ("stop" if stopped else "length")
            assert stopped or len(c.token_ids) == 24
            assert not any(t in STOPS for t in c.token_ids[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compaction_under_cuda_graphs():
    """On CUDA compaction is the default; each width gets its own graph, and every completion is the
    model's greedy choice under a full forward, up to bf16 near-ties (batch widths change the GEMM
    tiling, so on a tiny random model whose logits are nearly flat a tie may go either way)."""
    model = build_model("tiny", seed=3, dtype=torch.bfloat16, device_map="cuda").eval()
    kwargs = {"max_new_tokens": 24, "stop_token_ids": STOPS, "temperature": 0, "n": 2}
    engine = GenerationEngine(model, max_batch=32, refill_every=2, attend_bucket=16)
    assert engine.compact
    packed = engine.generate(PROMPTS, **kwargs)
    if engine.use_graphs:
        assert len({key[-1] for key in engine.graphs.graphs}) > 1  # graphs for several widths
    for prompt, completions in zip(PROMPTS, packed, strict=True):
        for c in completions:
            ids = torch.tensor([prompt + c.token_ids], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [C, V]
            chosen = logits.gather(1, torch.tensor(c.token_ids, device="cuda")[:, None]).squeeze(1)
            gap = logits.max(-1).values - chosen  # 0 where the engine took the full forward's argmax
            assert float(gap.max()) < 0.05 * float(logits.abs().max()), (prompt, c.token_ids)
            assert c.finish_reason == ("stop" if c.token_ids[-1] in STOPS else "length")
