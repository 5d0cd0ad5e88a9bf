"""On a GPU, the fused decode kernels (Triton MLA attention, MoE routing) against the unfused step."""

from __future__ import annotations

import copy

import pytest
import torch

from align.generation import GenerationEngine, LatentCache
from align.generation.forward import decode_logits
from align.kernels.dispatch import use_triton
from align.models import build_model
from tests.models.cases import CASES

from .conftest import full_logits, prefill_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [10 + i for i in range(34)], [1, 1, 2, 3, 5, 8, 13, 21, 34]]
STEPS = 6


def _teacher_forced(model, follow: list[list[int]]) -> torch.Tensor:
    """Decode-step logits [STEPS, slots, V] over the prompts, then the `follow` tokens."""
    cache = LatentCache.for_model(model.config, slots=len(PROMPTS), max_len=48, dtype=torch.bfloat16, device="cuda")
    prefill_prompts(model, cache, PROMPTS, device="cuda")
    tokens = torch.tensor([p[-1] for p in PROMPTS], device="cuda")
    pos = torch.tensor([len(p) - 1 for p in PROMPTS], device="cuda")
    steps = []
    with torch.no_grad():
        for step in range(STEPS):
            steps.append(decode_logits(model, cache, tokens, pos, attend_len=48))
            tokens = torch.tensor([f[step] for f in follow], device="cuda")
            pos = pos + 1
    return torch.stack(steps).cpu()


@pytest.mark.parametrize("case", list(CASES))
def test_fused_decode_as_close_to_full_forward_as_unfused(case, case_models):
    _, ours = case_models(case)
    model = copy.deepcopy(ours).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    follow = [torch.randint(0, ours.config.vocab_size, (STEPS,), generator=gen).tolist() for _ in PROMPTS]
    fused = _teacher_forced(model, follow)
    with use_triton(False):
        unfused = _teacher_forced(model, follow)
    exact = torch.stack([full_logits(ours, p, f)[:STEPS] for p, f in zip(PROMPTS, follow, strict=True)], 1)
    scale = exact.abs().max()
    err_fused = ((fused - exact).abs().max() / scale).item()
    err_unfused = ((unfused - exact).abs().max() / scale).item()
    assert err_fused <= 1.5 * err_unfused + 2e-3, (err_fused, err_unfused)
    assert ((fused - unfused).abs().max() / scale).item() < 0.05


def test_engine_recaptures_when_the_kernels_are_switched_off():
    model = build_model("tiny", seed=4, dtype=torch.bfloat16, device_map="cuda").eval()
    engine = GenerationEngine(model, max_batch=2)
    prompts = [PROMPTS[0], PROMPTS[2]]
    fused = engine.generate(prompts, max_new_tokens=8, temperature=0)
    if engine.use_graphs:
        assert engine.graphs.signature[1] is True
    with use_triton(False):
        plain = engine.generate(prompts, max_new_tokens=8, temperature=0)
        if engine.use_graphs:
            assert engine.graphs.signature[1] is False
    assert [len(c.token_ids) for [c] in fused] == [len(c.token_ids) for [c] in plain] == [8, 8]
