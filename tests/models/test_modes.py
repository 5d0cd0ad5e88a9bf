"""The model's forward in every mode: train / eval, with and without autograd, on CPU (float32) and on
CUDA (bfloat16), at token counts on both sides of each kernel size threshold. On CUDA a call without
autograd takes the Triton gate / sort / combine for at most SORT_MAX_SLOTS routed slots and the Triton
expert MLP for at most MAX_TOKENS tokens; a training-mode forward without autograd (e.g. GRPO's
old-policy pass) must still return its balance loss. Each call returns finite logits, and in train mode
a finite positive balance loss (None in eval mode)."""

from __future__ import annotations

import pytest
import torch

from align.kernels.dispatch import kernel_path, triton_ready
from align.kernels.moe_experts import MAX_TOKENS
from align.kernels.moe_route import SORT_MAX_SLOTS
from align.models import build_model
from align.models.presets import PRESETS

SEQ = 8  # tokens per row; the batch size sets the token count
TOP_K = PRESETS["tiny"]["num_experts_per_tok"]
ROUTE_LIMIT = SORT_MAX_SLOTS // TOP_K  # tokens: the most the Triton gate / sort / combine take
TOKENS = sorted({2 * SEQ, MAX_TOKENS, MAX_TOKENS + SEQ, ROUTE_LIMIT, ROUTE_LIMIT + SEQ})
DEVICES = [
    pytest.param(("cpu", torch.float32), id="cpu-float32"),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bfloat16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def test_token_counts_straddle_the_thresholds():
    assert all(n % SEQ == 0 for n in TOKENS)
    assert ROUTE_LIMIT * TOP_K <= SORT_MAX_SLOTS < (ROUTE_LIMIT + SEQ) * TOP_K
    assert MAX_TOKENS in TOKENS and MAX_TOKENS + SEQ in TOKENS


@pytest.fixture(scope="module", params=DEVICES)
def model_on(request):
    device, dtype = request.param
    return build_model("tiny", dtype=dtype, device_map=device, seed=0, num_hidden_layers=2), device


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_in_every_mode(model_on, tokens, grad, training):
    model, device = model_on
    model.train(training)
    ids = torch.randint(3, 1024, (tokens // SEQ, SEQ), generator=torch.Generator().manual_seed(tokens)).to(device)
    probe = torch.empty(tokens, 1, device=device)
    gate = model.model.layers[-1].mlp.gate.weight
    with torch.set_grad_enabled(grad):
        fused = kernel_path(probe, gate) and tokens * TOP_K <= SORT_MAX_SLOTS  # the gate's and sort's test
        assert fused == (triton_ready(probe) and not grad and tokens <= ROUTE_LIMIT)
        out = model(input_ids=ids)
    assert out.logits.shape == (tokens // SEQ, SEQ, 1024)
    assert torch.isfinite(out.logits).all()
    if not training:
        assert out.aux_loss is None
        return
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    if grad:
        (out.logits.float().mean() + out.aux_loss).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)
