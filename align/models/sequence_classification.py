"""DeepSeek-V2 / V3 with a scalar `score` head: the reward model `align rm` trains and `reward_model` runs.

Same backbone as DeepseekV2ForCausalLM (`model.*`), plus `score`, a bias-free Linear [num_labels, H],
applied to the final hidden state of each row's last token that is not `config.pad_token_id` (the
rightmost, so right and left padding both work). That is transformers' own rule
(GenericForSequenceClassification), so a checkpoint written here loads into transformers'
`DeepseekV2ForSequenceClassification` and scores the same token (tests/models/test_sequence_classification.py).
Checkpoints use the hub layout of align/models/checkpoint.py; `from_causal_lm` starts one from an SFT
checkpoint (its LM head is dropped, the score head is freshly initialised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from align.models.checkpoint import CheckpointError, load_model, save_model
from align.models.config import load_config
from align.models.model import DeepseekV2Model, DeepseekV2PreTrainedModel

CAUSAL_HEAD = "lm_head.weight"
SCORE_HEAD = "score.weight"


@dataclass
class ScoreOutput(SequenceClassifierOutputWithPast):
    """logits [B, num_labels] at each row's last non-pad token, plus the MoE balance loss (training)."""

    aux_loss: torch.Tensor | None = None


def last_token_index(input_ids: torch.Tensor | None, pad_id: int | None, batch: int, seq: int) -> torch.Tensor:
    """[B] index of each row's rightmost token that is not `pad_id` (transformers' rule: 0 for an all-pad
    row; the last position when there is no pad id or no ids)."""
    device = input_ids.device if input_ids is not None else None
    if input_ids is None or pad_id is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def is_score_checkpoint(path) -> bool:
    """Does this checkpoint directory hold a sequence-classification model (by its config's architectures)?"""
    return any(name.endswith("ForSequenceClassification") for name in load_config(path).architectures or [])


class DeepseekV2ForSequenceClassification(DeepseekV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = getattr(config, "num_labels", 1)
        self.model = DeepseekV2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, torch_dtype=None, device_map=None):
        """A local sequence-classification checkpoint (hub layout with a `score.weight`)."""
        if not is_score_checkpoint(path):
            raise CheckpointError(f"{path}: a checkpoint without a {SCORE_HEAD} (config architectures "
                                  f"{load_config(path).architectures}); a causal LM starts a reward model "
                                  f"through from_causal_lm (align rm's model.path)")
        model = load_model(cls, path, dtype=dtype if dtype is not None else torch_dtype, device_map=device_map)
        model.config._name_or_path = str(path)
        return model

    @classmethod
    def from_causal_lm(cls, path, *, dtype=None, device_map=None, num_labels: int = 1, seed: int = 0):
        """The backbone of a causal-LM checkpoint (e.g. an SFT `final/`) with a fresh score head
        (normal(0, initializer_range), seeded); the checkpoint's LM head is not loaded."""
        model = load_model(cls, path, dtype=dtype, device_map=device_map, skip=(CAUSAL_HEAD,),
                           fresh=(SCORE_HEAD,), num_labels=num_labels)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            model.score.weight.normal_(0.0, model.config.initializer_range)
        model.config._name_or_path = str(path)
        return model

    def save_pretrained(self, save_directory, state_dict=None, max_shard_size="5GB", **kwargs) -> None:
        """config.json (architectures DeepseekV2ForSequenceClassification, num_labels, pad_token_id) +
        safetensors in the hub layout, atomically."""
        self.config.architectures = [type(self).__name__]
        save_model(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ScoreOutput:
        """Scores [B, num_labels] at each row's last non-pad token (`config.pad_token_id`)."""
        backbone = self.model(input_ids, attention_mask, position_ids, inputs_embeds, token_mask=token_mask)
        hidden = backbone.last_hidden_state  # [B, S, H]
        batch, seq = hidden.shape[:2]
        last = last_token_index(input_ids, self.config.pad_token_id, batch, seq)
        pooled = hidden[torch.arange(batch, device=hidden.device), last]  # [B, H]: the head sees one token a row
        return ScoreOutput(logits=self.score(pooled), aux_loss=backbone.aux_loss)
