"""Batched token choice: greedy, or temperature + top-k + top-p sampling by the Gumbel-max trick.

Static shapes and no host reads (the uniform noise comes in as a tensor), so `choose` runs inside a
captured CUDA graph. The engine's noise is `keyed_noise`: a counter-based hash of (the
sequence's key, the token position, the vocabulary index), where `sequence_key` folds (seed, prompt
key, sample index) into the key. A completion is then a function of its own key only, not of which
slot, batch or process generated it (data-parallel GRPO keys prompts by their index in the step).

Log-probabilities returned for the chosen token are log_softmax(logits / temperature) - the
temperature-scaled policy, *before* top-k / top-p truncation (temperature 0 = greedy: plain
log_softmax(logits)). That is the quantity GRPO's old-policy log-probabilities need when training
scales logits by the same temperature (TRL divides logits by its `temperature` before log_softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.kernels.sample_rows import KeyedNoise, Noise, gumbel, mix32, sample_rows


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k

    def validate(self) -> SamplingParams:
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r}: must be a finite number >= 0 (0 = greedy)")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r}: must be in (0, 1] (1 = no nucleus truncation)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k={k!r}: must be an integer >= 0 (0 = no top-k)")
        return SamplingParams(float(t), float(p), int(k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GOLDEN32 = 0x9E3779B9


def _fold(value: int) -> int:
    """Any Python int -> 32 bits, both halves of its low 64 bits mixed in."""
    value &= (1 << 64) - 1
    return mix32(value ^ mix32(value >> 32))


def sequence_key(seed: int, prompt_key: int, sample: int) -> int:
    """The 32-bit noise key of sample `sample` of the prompt keyed `prompt_key`, under `seed`."""
    key = _fold(seed)
    key = mix32(key ^ mix32(_fold(prompt_key) + GOLDEN32))
    return mix32(key ^ mix32(sample + 2 * GOLDEN32))


def vocab_hashes(vocab: int, device) -> torch.Tensor:
    """[V] int64: the per-token-id half of `keyed_uniform`'s hash (fixed: the engine keeps it)."""
    return mix32(torch.arange(vocab, dtype=torch.long, device=device))


def keyed_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_hash: torch.Tensor) -> KeyedNoise:
    """keys [B], positions [B] (int64), vocab_hash [V] (`vocab_hashes`) -> the uniform noise [B, V] in
    (0, 1) whose row b is a pure function of (keys[b], positions[b]), as a KeyedNoise: the sampler
    hashes it in its own pass (static shapes, no host read, graph-safe)."""
    return KeyedNoise(mix32(keys ^ mix32(positions + 3 * GOLDEN32)), vocab_hash)  # row [B]


def keyed_uniform(keys: torch.Tensor, positions: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """keyed_noise as a float32 [B, V] tensor."""
    return keyed_noise(keys, positions, vocab_hash).uniform()


def truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> same with tokens outside top-k, then outside the top-p nucleus, at -inf."""
    vocab = logits.shape[-1]
    if top_k >= vocab:
        top_k = 0
    if top_p >= 1.0:
        if top_k == 0:
            return logits
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        return logits.masked_fill(logits < kth, float("-inf"))
    values, order = logits.sort(dim=-1, descending=True)  # [B, V]
    if top_k:
        values[:, top_k:] = float("-inf")
    probs = values.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # [B, V] mass of strictly more likely tokens
    values = values.masked_fill(mass_before >= top_p, float("-inf"))  # the most likely token always stays
    return torch.full_like(logits, float("-inf")).scatter(-1, order, values)


def choose(logits: torch.Tensor, params: SamplingParams, noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (token [B] int64, its log-probability [B] float32, see module doc).

    noise: uniform [B, V] in [0, 1) or a KeyedNoise, required unless greedy. Greedy (where top-k/top-p
    change nothing) and plain temperature sampling are align/kernels/sample_rows.py's op (one Triton
    launch on CUDA, which hashes keyed noise itself).
    """
    if params.greedy or (params.top_k == 0 and params.top_p >= 1.0):
        return sample_rows(logits, noise, params.temperature)
    uniform = noise.uniform() if isinstance(noise, KeyedNoise) else noise
    scaled = logits / params.temperature
    keep = truncate(scaled, params.top_k, params.top_p)
    token = (keep + gumbel(uniform)).argmax(-1)  # Gumbel-max: a draw from softmax(keep)
    return token, scaled.log_softmax(-1).gather(-1, token[:, None])[:, 0]
