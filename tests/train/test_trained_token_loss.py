"""The SFT step's loss (align.train.evaluate.trained_token_loss): the fused chunked head loss on the trained
positions equals the plain logits + cross-entropy computation, in value and in every gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.models import build_model
from align.train import evaluate
from align.train.evaluate import trained_token_loss
from align.train.lora import apply_lora, lora_config


def model_and_batch():
    model = build_model("tiny", dtype=torch.float64, seed=0).train()
    model = apply_lora(model, lora_config(model, r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1024, (2, 20), generator=gen)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt that does not train
    labels[1, 15:] = -100
    return model, {"input_ids": ids, "labels": labels}


def reference_loss(model, batch, n_items):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # [B, S-1, V]
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum") / n_items


class Wrapped(torch.nn.Module):
    """A head that is not a plain Linear (as an adapter on the head would be): its own forward runs."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_fused_head_loss_equals_logits_cross_entropy(monkeypatch):
    model, batch = model_and_batch()
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear
    fused = []
    real = evaluate.linear_nll_sum

    def spy(hidden, *args, **kwargs):
        fused.append(hidden.shape)
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(evaluate, "linear_nll_sum", spy)
    assert not evaluate.fused_head(torch.zeros(1), head)  # on the CPU the plain path runs; here, the CUDA one:
    monkeypatch.setattr(evaluate, "fused_head", lambda hidden, h: type(h) is torch.nn.Linear)
    trained = [p for p in model.parameters() if p.requires_grad]
    want = reference_loss(model, batch, 30)
    want_grads = torch.autograd.grad(want, trained)
    for loss_head in (head, Wrapped(head)):
        ce, _ = trained_token_loss(model, batch, 30, loss_head)
        torch.testing.assert_close(ce, want, rtol=1e-12, atol=0)
        for g, w in zip(torch.autograd.grad(ce * 3.0, trained), want_grads, strict=True):
            scale = w.abs().max()  # the router scores in float32 (any model dtype): float32-level agreement
            torch.testing.assert_close(g / scale, 3.0 * w / scale, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(trained_token_loss(model, batch, 30, head)[0], want.detach())
    assert len(fused) == 2  # the plain head and the no-grad call; the wrapped head ran its own forward
