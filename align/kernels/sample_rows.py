"""Token choice per row for plain temperature sampling and greedy decoding (inference only).

`sample_rows(logits, uniform, temperature)` returns, per row of logits [B, V], the Gumbel-max draw
argmax(logits / T + g(u)) with g(u) = -log(-log(u)) (temperature 0: argmax(logits)), and its
log-probability under log_softmax(logits / T) - align/generation/sampling.choose without
top-k/top-p. On CUDA one Triton program per row streams the row once (running max, running sum of
exponentials, best perturbed score), instead of the dozen full [B, V] passes of the PyTorch form.

The noise is either a uniform tensor [B, V] or a `KeyedNoise`: per row a 32-bit key, per vocabulary
index a 32-bit hash, u[b, v] a counter-based hash of the two (`KeyedNoise.uniform` is the reference).
The kernel hashes in its loop, so keyed noise costs no [B, V] tensor and no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.kernels.dispatch import kernel_path, require_contiguous_last_dim

MASK32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (lowbias32: xor-shift-multiply, a bijection on [0, 2^32)) of a Python int or
    an int64 tensor of values in [0, 2^32); the same numbers either way (tensor products wrap in 64 bits,
    whose low 32 bits are kept). sample_rows_triton.mix32 is the same function on uint32."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class KeyedNoise:
    """Uniform noise [B, V] defined by row [B] and vocab_hash [V] (int64 values in [0, 2^32))."""

    row: torch.Tensor
    vocab_hash: torch.Tensor

    def uniform(self) -> torch.Tensor:
        """The noise as a float32 [B, V] tensor in (0, 1), 23 bits: never 0 or 1."""
        x = mix32(self.vocab_hash[None, :] ^ self.row[:, None])  # [B, V]
        x = mix32(x + self.row[:, None])  # second round: rows differ by more than one xor constant
        return ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23


Noise = torch.Tensor | KeyedNoise | None


def sample_rows(logits: torch.Tensor, noise: Noise, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), noise: uniform [B, V] float32 or KeyedNoise (unused when
    temperature is 0) -> (token [B] int64, log-probability [B] float32)."""
    if kernel_path(logits):
        return _sample_rows_triton(logits, noise, temperature)
    if isinstance(noise, KeyedNoise):
        noise = noise.uniform()
    return sample_rows_reference(logits, noise, temperature)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniform [0, 1) samples."""
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp_min(tiny)))


def sample_rows_reference(
    logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As sample_rows, in PyTorch."""
    if temperature == 0:
        token = logits.argmax(-1)  # [B]
        return token, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    scaled = logits / temperature
    token = (scaled + gumbel(uniform)).argmax(-1)  # Gumbel-max: a draw from softmax(scaled)
    return token, scaled.log_softmax(-1).gather(-1, token[:, None])[:, 0]


def _sample_rows_triton(logits: torch.Tensor, noise: Noise, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As sample_rows, one program per row."""
    from align.kernels import sample_rows_triton  # Triton only where the kernel runs

    batch, vocab = logits.shape
    greedy = temperature == 0
    if not greedy and noise is None:
        raise ValueError("sample_rows: temperature > 0 needs noise (uniform [B, V] or KeyedNoise)")
    keyed = isinstance(noise, KeyedNoise) and not greedy
    if keyed:
        uniform, row, vocab_hash = logits, noise.row, noise.vocab_hash  # uniform unused
        if row.shape != (batch,) or vocab_hash.shape != (vocab,):
            raise ValueError(f"sample_rows: KeyedNoise needs row [{batch}] and vocab_hash [{vocab}], got "
                             f"{tuple(row.shape)} and {tuple(vocab_hash.shape)}")
    else:
        uniform = logits if greedy else noise
        row = vocab_hash = torch.empty(1, dtype=torch.long, device=logits.device)  # unused
    require_contiguous_last_dim("sample_rows", logits=logits, uniform=uniform)
    token = torch.empty(batch, dtype=torch.long, device=logits.device)
    logprob = torch.empty(batch, dtype=torch.float32, device=logits.device)
    sample_rows_triton.sample_kernel[(batch,)](
        logits, logits.stride(0), uniform, uniform.stride(0), row, vocab_hash, token, logprob, vocab,
        1.0 if greedy else float(temperature), GREEDY=greedy, KEYED=keyed, BLOCK_V=2048, num_warps=8,
    )
    return token, logprob
