"""Shared tiny models: transformers' reference for each case, and ours loaded from its checkpoint."""

from __future__ import annotations

import pytest
import torch

from align.generation.forward import prefill
from align.models import DeepseekV2ForCausalLM
from tests.models.cases import reference_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one intra-op thread is faster and immune to busy CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def case_models(tmp_path_factory):
    """case -> (transformers model, our model with the same weights), built once per session."""
    built: dict[str, tuple] = {}

    def get(case: str):
        if case not in built:
            ref = reference_model(case)
            path = tmp_path_factory.mktemp(case)
            ref.save_pretrained(path)
            built[case] = (ref, DeepseekV2ForCausalLM.from_pretrained(path))
        return built[case]

    return get


def full_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits a full forward (no cache) gives at the positions that predict each completion token."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [L + C, V]
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]  # [C, V]


def prefill_prompts(model, cache, prompts: list[list[int]], device: str = "cpu") -> None:
    """Packed prefill of every prompt but its last token, prompt s into cache slot s (as the engine
    does before feeding each last token through the decode step)."""
    packed = [p[:-1] for p in prompts]
    ids = torch.tensor([t for p in packed for t in p], device=device)
    positions = torch.tensor([i for p in packed for i in range(len(p))], device=device)
    slots = torch.tensor([s for s, p in enumerate(packed) for _ in p], device=device)
    prefill(model, cache, ids, positions, slots, documents=len(packed))
