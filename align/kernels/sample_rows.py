"""Token choice per row for plain temperature sampling and greedy decoding (inference only).

`sample_rows(logits, uniform, temperature)` returns, per row of logits [B, V], the Gumbel-max draw
argmax(logits / T + g(u)) with g(u) = -log(-log(u)) (temperature 0: argmax(logits)), and its
log-probability under log_softmax(logits / T) - align/generation/sampling.choose without
top-k/top-p. On CUDA one Triton program per row streams the row once (running max, running sum of
exponentials, best perturbed score), instead of the dozen full [B, V] passes of the PyTorch form.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import kernel_path, require_contiguous_last_dim


def sample_rows(
    logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), uniform [B, V] float32 (unused when temperature is 0)
    -> (token [B] int64, log-probability [B] float32)."""
    if kernel_path(logits):
        return _sample_rows_triton(logits, uniform, temperature)
    return sample_rows_reference(logits, uniform, temperature)


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


def _sample_rows_triton(
    logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As sample_rows, one program per row."""
    from align.kernels import sample_rows_triton  # Triton only where the kernel runs

    batch, vocab = logits.shape
    greedy = temperature == 0
    if not greedy and uniform is None:
        raise ValueError("sample_rows: temperature > 0 needs uniform noise [B, V]")
    noise = logits if greedy else uniform
    require_contiguous_last_dim("sample_rows", logits=logits, uniform=noise)
    token = torch.empty(batch, dtype=torch.long, device=logits.device)
    logprob = torch.empty(batch, dtype=torch.float32, device=logits.device)
    sample_rows_triton.sample_kernel[(batch,)](
        logits, logits.stride(0), noise, noise.stride(0), token, logprob, vocab,
        1.0 if greedy else float(temperature), GREEDY=greedy, BLOCK_V=2048, num_warps=8,
    )
    return token, logprob
