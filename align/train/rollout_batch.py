"""A generation round as tensors, and the per-token log-probabilities of its completions.

Each row is prompt + completion, right-padded: under causal attention padding after a sequence
never changes its positions, so no attention mask is needed and positions are plain aranges.
Completion token j of row i sits at position p_i + j and is predicted from p_i + j − 1; the
log-probabilities come from the fused LM-head kernel on those hidden states only, never [N, L, V]
logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from align.kernels.linear_logprob import linear_logprobs_entropy


@dataclass
class RolloutBatch:
    input_ids: Tensor  # [N, L] prompt + completion, right-padded
    prompt_lens: Tensor  # [N]
    completion_ids: Tensor  # [N, C] right-padded
    token_mask: Tensor  # [N, C] 1 on the generated tokens
    loss_mask: Tensor  # [N, C] token_mask, minus truncated rows when those are masked
    advantages: Tensor  # [N]
    old_logps: Tensor | None = None  # [N, C] when num_iterations > 1
    ref_logps: Tensor | None = None  # [N, C] when beta > 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Rows [start, stop), trimmed to the longest sequence among them."""
        part = {f.name: getattr(self, f.name) for f in fields(self)}
        part = {k: None if v is None else v[start:stop] for k, v in part.items()}
        width = int((part["prompt_lens"] + part["token_mask"].sum(-1)).max())
        part["input_ids"] = part["input_ids"][:, :width]
        return RolloutBatch(**part)


def make_batch(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], advantages: Tensor,
    pad_id: int, loss_mask_fn=None, device: torch.device | str = "cpu",
) -> RolloutBatch:
    """Pad a round; `loss_mask_fn(completion_ids [N, C], token_mask [N, C]) -> loss mask` (e.g. masking
    truncated completions), identity by default."""
    n = len(prompt_ids)
    width_c = max(1, max(len(c) for c in completion_ids))
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    comp = torch.full((n, width_c), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width_c, dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor([*p, *c], dtype=torch.long)
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1.0
    loss_mask = mask if loss_mask_fn is None else loss_mask_fn(comp, mask)
    lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    return RolloutBatch(ids.to(device), lens.to(device), comp.to(device), mask.to(device), loss_mask.to(device),
                        advantages.to(device=device, dtype=torch.float32))


def completion_logprobs(model, head: torch.nn.Module, batch: RolloutBatch, temperature: float) -> Tensor:
    """log π(completion token) under log_softmax(logits / temperature): [N, C] float32, 0 off the mask."""
    return completion_logprobs_entropy(model, head, batch, temperature, with_entropy=False)[0]


def completion_logprobs_entropy(
    model, head: torch.nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(log-probs as completion_logprobs, the policy's entropy at each completion position without
    gradient [N, C], or None)."""
    hidden = model(input_ids=batch.input_ids, return_logits=False).last_hidden_state  # [N, L, H]
    n, c = batch.completion_ids.shape
    offsets = torch.arange(c, device=hidden.device)
    pos = (batch.prompt_lens[:, None] - 1 + offsets[None]).clamp(max=hidden.shape[1] - 1)  # [N, C]
    rows = torch.arange(n, device=hidden.device)[:, None].expand(n, c)
    keep = batch.token_mask.bool()
    picked = hidden[rows[keep], pos[keep]]  # [tokens, H]
    logps, entropy = linear_logprobs_entropy(picked, head.weight, batch.completion_ids[keep], temperature,
                                             with_entropy=with_entropy)
    grid = torch.zeros(n, c, dtype=logps.dtype, device=logps.device)
    return grid.masked_scatter(keep, logps), grid.masked_scatter(keep, entropy) if with_entropy else None
