"""Which tokens attend to which in a training or prefill forward: packed documents, padding, causality.

A row may hold several documents laid end to end (position_ids restart at 0 for each) and padding
(attention_mask 0). Two forms of the same rule, chosen once per forward by `attention_layout`:
- `Segments`: the tokens of all rows flattened, cut into per-document segments, for the varlen
  attention kernel (align.kernels.varlen_attention). No [S, S] mask; padding at a row's ends forms
  segments of its own, padding inside a document is left out. Used where that kernel runs (CUDA, 16-bit).
- a boolean [B|1, 1, S, past+S] mask (`attention_mask_for`) for SDPA elsewhere (CPU, float32, or
  queries over cached keys).
Real tokens get the same attention from both; None means plain causal over whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.kernels.varlen_attention import flash_varlen_ready


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A new document starts wherever the position does not grow by one. [B, S] -> [B, S]."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(-1)


def attention_mask_for(
    doc_ids: torch.Tensor | None, key_valid: torch.Tensor | None, seq: int, device: torch.device, past: int = 0
) -> torch.Tensor | None:
    """Boolean [B|1, 1, S, past+S] mask: causal, within a document, keys not padding; None = plain causal.

    key_valid [B, past+S] marks real tokens; `past` cached positions come before the S queries.
    """
    if doc_ids is None and key_valid is None and past == 0:
        return None
    query_pos = torch.arange(past, past + seq, device=device)[:, None]  # [S, 1]
    key_pos = torch.arange(past + seq, device=device)[None]  # [1, T]
    allowed = (key_pos <= query_pos)[None]  # [1, S, T]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, S, S]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
        allowed = allowed | (key_pos == query_pos)  # padding rows see themselves
    return allowed[:, None]


@dataclass(frozen=True)
class Segments:
    """The tokens of a [B, S] batch as causal segments of the flattened B*S positions."""

    cu_seqlens: torch.Tensor  # int32 [N + 1]: segment n is tokens cu[n] .. cu[n+1]-1 (of `keep`, or of B*S)
    max_len: int  # the longest segment
    keep: torch.Tensor | None  # [T] flat indices (into B*S) of the real tokens; None = all B*S


def segments_for(doc_ids: torch.Tensor | None, key_valid: torch.Tensor | None, batch: int, seq: int,
                 device: torch.device) -> Segments:
    """Segments of the tokens: a new one at each row start and document change. doc_ids, key_valid [B, S]
    or None. Padding inside a document (a hole) does not split it.

    Padding at a row's ends (right-padded chats, left-padded prompts) becomes segments of its own, which
    attend among themselves and whose outputs nothing reads: the kernel then runs on the B*S tokens in place
    (keep None), with no gather of q, k, v and scatter of the output in every layer. Only a hole makes the
    segments of the real tokens alone, gathered through `keep`."""
    rows = torch.arange(batch, device=device)[:, None] * (seq + 1)  # [B, 1]: row ids apart from doc ids
    owner = (rows + (doc_ids if doc_ids is not None else 0)).expand(batch, seq).reshape(-1)  # [B*S]
    if key_valid is None or not owner.numel():
        return _cut(owner, None)
    valid = key_valid.reshape(-1).bool()  # [B*S]
    starts = _starts(owner * 2 + valid)  # documents and padding runs apart
    kind, first_owner = valid[starts], owner[starts]  # [N] each: a real segment?, its document
    index = torch.arange(starts.numel(), device=device)
    last_real = torch.where(kind, index, -1).cummax(0).values  # [N]: the latest real segment up to n
    before = torch.cat([last_real.new_tensor([-1]), last_real[:-1]])  # [N]: the latest real one before n
    same_doc = first_owner[before.clamp(min=0)] == first_owner
    hole = kind & (before >= 0) & (before != index - 1) & same_doc  # a real segment after padding, same document
    cu = torch.cat([starts, starts.new_tensor([owner.numel()])]).to(torch.int32)  # [N + 1]
    longest, has_hole = torch.stack([(cu[1:] - cu[:-1]).max(), hole.any().to(cu.dtype)]).tolist()
    if not has_hole:
        return Segments(cu, longest, None)
    keep = valid.nonzero().squeeze(1)  # [T]
    return _cut(owner[keep], keep)


def _starts(owner: torch.Tensor) -> torch.Tensor:
    """Flat indices where the owner changes (and 0): [N]. owner [n] non-empty."""
    first = torch.ones_like(owner, dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]
    return first.nonzero().squeeze(1)


def _cut(owner: torch.Tensor, keep: torch.Tensor | None) -> Segments:
    """Segments of runs of equal owner [T]."""
    if not owner.numel():
        return Segments(torch.zeros(1, dtype=torch.int32, device=owner.device), 0, keep)
    starts = _starts(owner)
    cu = torch.cat([starts, starts.new_tensor([owner.numel()])]).to(torch.int32)  # [N + 1]
    return Segments(cu, int((cu[1:] - cu[:-1]).max()), keep)


def segments_enabled(x: torch.Tensor) -> bool:
    """Whether forwards on activations like x attend through Segments (the varlen kernel runs)."""
    return flash_varlen_ready(x)


def attention_layout(
    x: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past: int = 0,
    shape: tuple[int, int] | None = None,
) -> torch.Tensor | Segments | None:
    """The attention rule for activations x [B, S, ...] (or of `shape` (B, S) and x's device / dtype):
    None (plain causal), Segments, or a dense mask.

    position_ids [B, S] restarting inside a row mark packed documents (ignored over cached keys);
    attention_mask [B, past+S] (1 = real token) or None = no padding (pass None rather than all ones: a
    mask sends the forward to Segments or the dense mask)."""
    batch, seq = shape or x.shape[:2]
    doc_ids = None if position_ids is None or past else document_ids(position_ids)
    if doc_ids is not None and attention_mask is None and bool((doc_ids[:, -1] == 1).all()):
        doc_ids = None  # one document per row: plain causal
    if past == 0 and (doc_ids is not None or attention_mask is not None) and segments_enabled(x):
        return segments_for(doc_ids, attention_mask, batch, seq, x.device)
    return attention_mask_for(doc_ids, attention_mask, seq, x.device, past)
