"""One-pass token choice per row for plain temperature sampling and greedy decoding (inference only).

`sample_rows(logits, uniform, temperature)` returns, per row of logits [B, V], the Gumbel-max draw
argmax(logits / T + g(u)) with g(u) = -log(-log(u)) (temperature 0: argmax(logits)), and its
log-probability under log_softmax(logits / T) - the semantics of align/generation/sampling.choose
without top-k/top-p. One program per row streams the row once (running max, running sum of
exponentials, best perturbed score), instead of the dozen full [B, V] passes of the PyTorch form.
The reference is `choose` itself.
"""

from __future__ import annotations

import torch

from align.kernels.dispatch import require_contiguous_last_dim, triton_ready


def sample_rows(
    logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), uniform [B, V] float32 (unused when temperature is 0)
    -> (token [B] int64, log-probability [B] float32)."""
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


def fused_sampling_available(logits: torch.Tensor) -> bool:
    """Whether sample_rows runs for these logits (CUDA with Triton)."""
    return triton_ready(logits)
