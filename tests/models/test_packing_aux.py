"""Packed documents equal separate runs; the balance loss equals a hand computation."""

from __future__ import annotations

import pytest
import torch

from align.kernels.grouped_mm import grouped_linear, grouped_linear_reference
from align.models import build_model
from align.models.moe import balance_loss


def test_packed_equals_separate():
    model = build_model("tiny", seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 1024, (n,), generator=gen) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]  # [1, 24]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert (out - alone).abs().max() / alone.abs().max() < 1e-5


def test_packed_loss_and_grad_equal_separate():
    model = build_model("tiny", seed=4).eval()
    docs = [torch.arange(3, 3 + n) for n in (6, 9)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = packed.clone()
    labels[0, len(docs[0])] = -100  # no prediction across the document boundary
    model(packed, position_ids=positions, labels=labels).loss.backward()
    grad_packed = model.lm_head.weight.grad.clone()
    model.zero_grad()
    counts = [len(d) - 1 for d in docs]
    total = sum(model(d[None], labels=d[None]).loss * c for d, c in zip(docs, counts, strict=True))
    (total / sum(counts)).backward()
    assert torch.allclose(grad_packed, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_balance_loss_hand_computed():
    # 1 sequence of 2 tokens, 4 experts, top-2, alpha 0.5.
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    experts = torch.tensor([[0, 1], [0, 3]])
    # f_e = E/(k*T) * count = 4/4 * [2, 1, 0, 1]; P = mean scores = [0.25, 0.25, 0.25, 0.25]
    expected = 0.5 * (2 * 0.25 + 1 * 0.25 + 0 + 1 * 0.25)
    for seq_aux in (True, False):
        got = balance_loss(scores, experts, batch=1, alpha=0.5, seq_aux=seq_aux)
        assert torch.isclose(got, torch.tensor(expected)), (seq_aux, got)


def test_balance_loss_per_sequence_and_masked():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.9, 0.1]])
    experts = torch.tensor([[0], [1], [0], [0]])
    # seq 0: f = 2/2*[1,1], P = [0.5,0.5] -> 1.0; seq 1 with token 3 masked: f = 2*[1,0], P=[.5,.5] -> 1.0
    mask = torch.tensor([[1, 1], [1, 0]])
    got = balance_loss(scores, experts, batch=2, alpha=1.0, seq_aux=True, token_mask=mask)
    assert torch.isclose(got, torch.tensor(1.0))


def test_model_returns_balance_loss_in_training_only():
    model = build_model("tiny", seed=5)
    ids = torch.randint(0, 1024, (2, 10))
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    model.eval()
    assert model(ids).aux_loss is None


def test_grouped_linear_reference_matches_loop():
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor([3, 3, 8, 9], dtype=torch.int32)  # 3, 0, 5 and 1 rows
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    out = grouped_linear_reference(x, w, ends)
    bounds = [0, 3, 3, 8, 9]
    loop = torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e].T for e in range(4)])
    assert torch.allclose(out, loop)
    assert torch.allclose(grouped_linear(x, w, ends), loop)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    lx, lw = torch.autograd.grad(loop, (x, w), grad)
    assert torch.allclose(gx, lx) and torch.allclose(gw, lw)


def _segment_vs_mask_case(monkeypatch, enabled: bool, batch: dict):
    import align.models.layout as layout

    monkeypatch.setattr(layout, "segments_enabled", lambda x: enabled)
    model = build_model("tiny", seed=5, dtype=torch.float64).train()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_segments_path_equals_dense_mask(monkeypatch):
    """Packed rows with padding tails, through the varlen layout (its reference on CPU) and the dense
    mask: same logits at real tokens, same loss (balance loss included), same gradients."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1024, (2, 16), generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1],
                              [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 0, 1, 2]])
    mask = torch.ones_like(ids)
    mask[0, 14:], mask[1, 13:] = 0, 0  # padding tails
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "labels": labels}
    dense = _segment_vs_mask_case(monkeypatch, False, batch)
    seg = _segment_vs_mask_case(monkeypatch, True, batch)
    real = mask.bool()
    torch.testing.assert_close(seg[0][real], dense[0][real])
    torch.testing.assert_close(seg[1], dense[1])
    assert seg[2].keys() == dense[2].keys()
    for name in dense[2]:
        torch.testing.assert_close(seg[2][name], dense[2][name], msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen FlashAttention path runs on CUDA")
def test_flash_segments_equal_dense_mask_on_gpu(monkeypatch):
    """bf16 on CUDA: packed rows take the varlen kernel by themselves; logits at real tokens and the
    loss match the dense-mask path (bf16 tolerance)."""
    import align.models.layout as layout

    model = build_model("tiny", seed=6, dtype=torch.bfloat16, device_map="cuda").eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [(40, 90, 30), (160,)]
    ids = torch.randint(1, 1024, (2, 180), generator=gen).cuda()
    positions = torch.stack([torch.cat([torch.arange(n) for n in (*docs, 180 - sum(docs))]) for docs in lengths]).cuda()
    mask = torch.ones_like(ids)
    mask[0, 160:], mask[1, 160:] = 0, 0
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
    assert isinstance(layout.attention_layout(model.model.embed_tokens(ids), positions, mask), layout.Segments)
    with torch.no_grad():
        fast = model(**batch).logits.float()
        monkeypatch.setattr(layout, "segments_enabled", lambda x: False)
        dense = model(**batch).logits.float()
    real = mask.bool()
    err = (fast[real] - dense[real]).abs().max() / dense[real].abs().max()
    assert err < 2e-2, err
