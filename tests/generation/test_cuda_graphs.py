"""Graph bookkeeping on any machine; CUDA-graph decode equals eager decode where a GPU exists."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from align.generation import GenerationEngine
from align.generation.graphs import model_signature
from align.models import build_model

PROMPTS = [[0, 21, 22, 23, 24], [0, 50], [0, 7, 8, 9, 10, 11, 12, 13]]


def test_signature_tracks_adapter_state_and_weight_addresses():
    model = get_peft_model(build_model("tiny", seed=1), LoraConfig(r=2, target_modules=["kv_b_proj"]))
    before = model_signature(model)
    assert model_signature(model) == before
    with model.disable_adapter():
        assert model_signature(model) != before
    assert model_signature(model) == before
    model.base_model.model.lm_head.weight.data = model.base_model.model.lm_head.weight.data.clone()
    assert model_signature(model) != before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.9, "top_p": 0.9}, {"temperature": 1.0}, {"temperature": 0.0}],  # 2 last: one-pass sampler
)
def test_graph_decode_equals_eager(dtype, sampling):
    model = build_model("tiny", seed=4, dtype=dtype, device_map="cuda").eval()
    kwargs = {"max_new_tokens": 40, "n": 3, "seed": 5, **sampling}
    eager = GenerationEngine(model, cuda_graphs=False, max_batch=4).generate(PROMPTS, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns; fail instead
        engine = GenerationEngine(model, max_batch=4, attend_bucket=16)
        # default: graphs only where the MoE step is sync-free (bf16 grouped GEMM on Hopper)
        assert engine.use_graphs == (dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9)
        graphed = engine.generate(PROMPTS, **kwargs)
        again = engine.generate(PROMPTS, **kwargs)
    ids = lambda res: [[c.token_ids for c in row] for row in res]
    assert ids(graphed) == ids(eager) == ids(again)
    for row_a, row_b in zip(graphed, eager, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
