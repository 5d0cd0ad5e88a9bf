"""The score-head model against transformers' own DeepseekV2ForSequenceClassification (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from align.models.checkpoint import CheckpointError
from align.models.sequence_classification import DeepseekV2ForSequenceClassification

from .cases import reference_model

PAD = 96  # the last id of the cases' 97-token vocabulary


def padded_batch(vocab: int) -> torch.Tensor:
    """Three rows of different lengths: right padded, left padded, and full."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab - 1, (3, 24), generator=gen)
    ids[0, 15:] = PAD
    ids[1, :6] = PAD
    return ids


@pytest.fixture
def ours(tmp_path) -> DeepseekV2ForSequenceClassification:
    reference_model("v2_lite").save_pretrained(tmp_path / "lm")
    model = DeepseekV2ForSequenceClassification.from_causal_lm(tmp_path / "lm", seed=3)
    model.config.pad_token_id = PAD
    return model


def test_from_causal_lm_keeps_the_backbone(ours, tmp_path):
    lm = reference_model("v2_lite")
    with torch.no_grad():
        hidden = lm.model(torch.arange(10)[None]).last_hidden_state
        assert torch.allclose(ours.model(torch.arange(10)[None]).last_hidden_state, hidden, atol=1e-5)
    assert ours.score.weight.shape == (1, lm.config.hidden_size) and ours.score.weight.abs().sum() > 0


def test_checkpoint_scores_the_same_in_transformers(ours, tmp_path):
    ours.save_pretrained(tmp_path / "rm", max_shard_size="50KB")
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager").eval()
    assert type(theirs).__name__ == "DeepseekV2ForSequenceClassification"
    ids = padded_batch(ours.config.vocab_size)
    mask = (ids != PAD).long()
    with torch.no_grad():
        mine, ref = ours.eval()(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    assert mine.shape == ref.shape == (3, 1)
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-5), (mine, ref)


def test_reads_transformers_checkpoint(ours, tmp_path):
    ours.save_pretrained(tmp_path / "rm")
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager")
    theirs.save_pretrained(tmp_path / "theirs")
    back = DeepseekV2ForSequenceClassification.from_pretrained(tmp_path / "theirs").eval()
    ids = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(back(ids, attention_mask=(ids != PAD).long()).logits,
                              ours.eval()(ids, attention_mask=(ids != PAD).long()).logits, atol=1e-6)


def test_causal_lm_checkpoint_is_not_a_reward_model(tmp_path):
    reference_model("v2_lite").save_pretrained(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="from_causal_lm"):
        DeepseekV2ForSequenceClassification.from_pretrained(tmp_path / "lm")
