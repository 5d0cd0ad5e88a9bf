"""What a generation call asks for and what it returns, checked up front with errors a user can act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.generation.sampling import SamplingParams


@dataclass
class Completion:
    """One sampled continuation. token_ids include the stop token when one ended it; logprobs[i] is the
    log-probability of token_ids[i] (see align.generation.sampling for the exact definition). routing
    (when asked for): the experts of every token the engine fed, align.generation.routing."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token id) or "length" (max_new_tokens reached)
    routing: torch.Tensor | None = None  # [prompt_len - 1 + len(token_ids), moe_layers, k] int8 / int16


@dataclass(frozen=True)
class Request:
    prompts: list[list[int]]
    max_new_tokens: int
    n: int
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    seed: int | None

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n

    def cache_len(self) -> int:
        """Cache positions the longest prompt needs (the last sampled token is never fed back)."""
        return max(len(p) for p in self.prompts) + self.max_new_tokens - 1


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    return value


def _token_list(value, vocab: int, where: str) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{where}: expected a list of token ids, got {type(value).__name__}")
    ids = [int(t) for t in value]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{where}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids


def _stop_ids(eos_token_id, stop_token_ids, vocab: int) -> tuple[int, ...]:
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = eos + list(stop_token_ids or ())
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"eos_token_id / stop_token_ids: {t!r} is not a token id in [0, {vocab})")
    return tuple(dict.fromkeys(ids))


def build_request(
    prompt_token_ids, vocab: int, *, max_new_tokens, temperature, top_p, top_k, n, eos_token_id,
    stop_token_ids, seed,
) -> Request:
    if isinstance(prompt_token_ids, str | bytes) or not isinstance(prompt_token_ids, Sequence):
        raise ValueError(f"prompt_token_ids: expected a list of token-id lists, got {type(prompt_token_ids).__name__}")
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt_token_ids is empty: pass at least one prompt (a list of token ids)")
    prompts = [_token_list(p, vocab, f"prompt_token_ids[{i}]") for i, p in enumerate(prompt_token_ids)]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt_token_ids[{empty[0]}] is empty: every prompt needs at least one token (e.g. BOS)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r}: must be an integer or None")
    sampling = SamplingParams(temperature, top_p, top_k).validate()
    return Request(
        prompts, _positive_int("max_new_tokens", max_new_tokens), _positive_int("n", n), sampling,
        _stop_ids(eos_token_id, stop_token_ids, vocab), seed,
    )
