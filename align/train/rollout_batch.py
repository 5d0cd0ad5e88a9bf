"""A generation round as tensors, and the per-token log-probabilities of its completions.

Each row is prompt + completion, right-padded: under causal attention padding after a sequence
never changes its positions, so no attention mask is needed and positions are plain aranges.
Completion token j of row i sits at position p_i + j and is predicted from p_i + j − 1; the
log-probabilities come from the fused LM-head kernel on those hidden states only, never [N, L, V]
logits. With the engine's routing (`routing`, align.generation.routing) the policy's forwards can
route each token to the experts it had in the rollout (routing replay), recomputing only the gate
weights, so the router still gets gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from align.kernels.linear_logprob import linear_logprobs_entropy
from align.models.config import moe_layers
from align.models.moe import RoutingTrace


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
    sample_logps: Tensor | None = None  # [N, C] the engine's log-probs of the sampled tokens
    routing: Tensor | None = None  # [N, L, moe_layers, k] the engine's experts per fed position, -1 = none

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Rows [start, stop), trimmed to the longest sequence among them."""
        part = {f.name: getattr(self, f.name) for f in fields(self)}
        part = {k: None if v is None else v[start:stop] for k, v in part.items()}
        width = int((part["prompt_lens"] + part["token_mask"].sum(-1)).max())
        part["input_ids"] = part["input_ids"][:, :width]
        if part["routing"] is not None:
            part["routing"] = part["routing"][:, :width]
        return RolloutBatch(**part)

    def lengths(self) -> Tensor:
        """[N] prompt + completion tokens of each row."""
        return self.prompt_lens + self.token_mask.sum(-1).long()

    def permuted(self, order: Tensor) -> RolloutBatch:
        """The rows in `order` (a permutation of the row indices), every per-row field alike."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{name: None if v is None else v[order] for name, v in values.items()})

    def by_length(self) -> RolloutBatch:
        """The rows sorted by prompt + completion length (stable), so that consecutive micro-batches hold
        rows of similar length and `rows` pads them little."""
        return self.permuted(torch.argsort(self.lengths(), stable=True))

    def real_tokens(self) -> Tensor:
        """[N, L] 1 on prompt and completion tokens, 0 on padding (what the balance loss counts)."""
        lengths = self.lengths()
        return (torch.arange(self.input_ids.shape[1], device=lengths.device)[None] < lengths[:, None]).float()

    def replay(self, layers: list[int]) -> dict[int, Tensor]:
        """MoE layer index -> the recorded experts [N*L, k] of every position (a RoutingTrace replay)."""
        n, width, _, k = self.routing.shape
        return {layer: self.routing[:, :, m].reshape(n * width, k) for m, layer in enumerate(layers)}


def make_batch(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], advantages: Tensor,
    pad_id: int, loss_mask_fn=None, device: torch.device | str = "cpu",
    sample_logprobs: Sequence[Sequence[float]] | None = None, routing: Sequence[Tensor] | None = None,
) -> RolloutBatch:
    """Pad a round; `loss_mask_fn(completion_ids [N, C], token_mask [N, C]) -> loss mask` (e.g. masking
    truncated completions), identity by default. sample_logprobs: the engine's, per completion;
    routing: the engine's recorded experts per completion [fed positions, moe_layers, k] (Completion.routing)."""
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
    batch = RolloutBatch(ids.to(device), lens.to(device), comp.to(device), mask.to(device), loss_mask.to(device),
                         advantages.to(device=device, dtype=torch.float32))
    if sample_logprobs is not None:
        sampled = torch.zeros(n, width_c, dtype=torch.float32)
        for i, lp in enumerate(sample_logprobs):
            sampled[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        batch.sample_logps = sampled.to(device)
    if routing is not None:
        batch.routing = pad_routing(routing, width, device)
    return batch


def pad_routing(routing: Sequence[Tensor], width: int, device) -> Tensor:
    """Per-completion routing [fed_i, M, k] -> [N, width, M, k], -1 past each one's fed positions."""
    first = routing[0]
    out = torch.full((len(routing), width, *first.shape[1:]), -1, dtype=first.dtype, device=device)
    for i, r in enumerate(routing):
        out[i, : r.shape[0]] = r.to(device)
    return out


def completion_logprobs(
    model, head: torch.nn.Module, batch: RolloutBatch, temperature: float, replay: bool = False
) -> Tensor:
    """log π(completion token) under log_softmax(logits / temperature): [N, C] float32, 0 off the mask.
    replay: route each token to its recorded experts (batch.routing)."""
    return policy_pass(model, head, batch, temperature, with_entropy=False, replay=replay).logps


def completion_logprobs_entropy(
    model, head: torch.nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(log-probs as completion_logprobs, the policy's entropy at each completion position without
    gradient [N, C], or None)."""
    out = policy_pass(model, head, batch, temperature, with_entropy=with_entropy)
    return out.logps, out.entropy


@dataclass
class PolicyPass:
    """One forward of the policy over a batch."""

    logps: Tensor  # [N, C] float32, 0 off the token mask
    entropy: Tensor | None  # [N, C] without gradient, when asked for
    aux_loss: Tensor | None  # the MoE balance loss over the real tokens (training mode, alpha > 0)
    trace: RoutingTrace | None  # what the MoE layers routed (replay or observe)


def policy_pass(
    model, head: torch.nn.Module, batch: RolloutBatch, temperature: float, *, with_entropy: bool = True,
    replay: bool = False, observe: bool = False,
) -> PolicyPass:
    """Log-probs (and entropy) of the completions. replay: force batch.routing's recorded experts (rows
    of -1 choose by themselves); observe: record each layer's routing and own choice in the trace."""
    trace = None
    if replay or observe:
        if replay and batch.routing is None:
            raise ValueError("routing replay needs the engine's recorded routing (generate(record_routing=True))")
        config = getattr(model, "module", model).config  # DDP keeps the model in .module
        trace = RoutingTrace(replay=batch.replay(moe_layers(config)) if replay else None, own_choice=observe)
    out = model(input_ids=batch.input_ids, return_logits=False, routing=trace, token_mask=batch.real_tokens())
    logps, entropy = _gather_logprobs(out.last_hidden_state, head, batch, temperature, with_entropy)
    return PolicyPass(logps, entropy, out.aux_loss, trace)


def _gather_logprobs(
    hidden: Tensor, head: torch.nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Hidden states [N, L, H] -> log-probs (and entropy) of the completion tokens, [N, C]."""
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
