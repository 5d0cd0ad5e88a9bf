"""The engine records each fed token's experts per MoE layer (align.generation.routing)."""

from __future__ import annotations

import pytest
import torch

from align.generation import GenerationEngine
from align.generation.routing import routing_dtype
from align.models import build_model
from align.models.moe import RoutingTrace

PROMPTS = [[0, 5, 9, 13, 17], [0, 7], [0]]


def generate(model, record: bool, **kwargs):
    engine = GenerationEngine(model, max_batch=4, refill_every=3)
    return engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, n=2, seed=3, record_routing=record, **kwargs)


def test_recorded_routing_is_what_the_full_forward_picks():
    model = build_model("tiny", seed=5)  # 3 layers: MoE layers 1 and 2
    out = generate(model, record=True)
    moe_layers = [1, 2]
    for prompt, completions in zip(PROMPTS, out, strict=True):
        for c in completions:
            fed = len(prompt) - 1 + len(c.token_ids)
            assert c.routing.shape == (fed, len(moe_layers), 2) and c.routing.dtype == torch.int8
            trace = RoutingTrace()
            with torch.no_grad():
                model.eval()(input_ids=torch.tensor([prompt + c.token_ids]), routing=trace)
            for m, layer in enumerate(moe_layers):
                own = trace.layers[layer].experts[:fed].sort(-1).values
                recorded = c.routing[:, m].long()
                known = recorded[:, 0] >= 0
                if layer == moe_layers[-1]:  # the prefill never runs the last layer: the prompt is unknown
                    assert not known[: len(prompt) - 1].any() and known[len(prompt) - 1 :].all()
                else:
                    assert known.all()
                assert torch.equal(recorded[known].sort(-1).values, own[known])


def test_recording_changes_no_token():
    model = build_model("tiny", seed=6)
    plain, recorded = generate(model, record=False), generate(model, record=True)
    for a, b in zip(plain, recorded, strict=True):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.logprobs for c in a] == [c.logprobs for c in b]
        assert all(c.routing is None for c in a)


def test_dense_model_records_nothing_and_dtype_fits_the_experts():
    model = build_model("tiny", seed=7, first_k_dense_replace=3)
    assert all(c.routing is None for row in generate(model, record=True) for c in row)
    assert routing_dtype(64) == torch.int8 and routing_dtype(128) == torch.int8 and routing_dtype(160) == torch.int16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recording_inside_cuda_graphs_equals_eager():
    model = build_model("tiny", seed=8, dtype=torch.bfloat16, device_map="cuda")
    graphed = GenerationEngine(model, max_batch=4, refill_every=3, cuda_graphs=True)
    eager = GenerationEngine(model, max_batch=4, refill_every=3, cuda_graphs=False)
    kwargs = {"max_new_tokens": 6, "temperature": 1.0, "n": 2, "seed": 3, "record_routing": True}
    a, b = graphed.generate(PROMPTS, **kwargs), eager.generate(PROMPTS, **kwargs)
    assert graphed.graphs.enabled and graphed.graphs.graphs
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert x.token_ids == y.token_ids and torch.equal(x.routing, y.routing)
