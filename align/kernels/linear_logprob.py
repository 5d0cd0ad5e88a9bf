"""Fused LM head + log-softmax at target tokens, chunked over tokens: never holds [N, V] logits.

`linear_logprobs(hidden, weight, targets, temperature)` returns log p(target) under
softmax(hidden @ weight.T / temperature), in float32, with a backward that recomputes each chunk's
logits instead of storing them. Peak extra memory is one [chunk, V] float32 block (chunk 1024 ×
vocab 102400 = 400 MiB) instead of [N, V] logits plus their gradient (N = 8192: 3.4 GiB each).
`linear_logprobs_reference` is the plain PyTorch computation it is tested against.

`linear_cross_entropy`, the causal-LM loss (SFT), takes its gradient in the forward instead: its loss
is a sum whose gradient is known there up to the incoming scalar, so each chunk's logits give the loss
term and (softmax - onehot) @ W at once, and backward only scales what the forward kept (an [N, H]
gradient in place of the [N, H] hidden states): the LM head is multiplied once per step, not twice.
A trainable head's weight gradient is summed over the chunks in float32 inside the GEMM on CUDA
(`add_product_`).

Per chunk, what follows the head GEMM (log-sum-exp, the target's log-prob, the entropy; softmax - onehot,
scaled) is `logits_stats` / `logits_grad`: on CUDA two Triton kernels that read the GEMM's 16-bit logits
in place (one pass for the statistics, one that overwrites them with their gradient), elsewhere their
PyTorch references (`logits_stats_reference`, `logits_grad_reference`, float32 [c, V] blocks).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from align.kernels.dispatch import pow2_block, require_contiguous_last_dim, triton_ready

CHUNK = 1024
BLOCK = 4096  # vocabulary tile of the row kernels


def linear_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] -> log p(target) [N] (float32, or float64 inputs' dtype)."""
    logits = (hidden @ weight.T).to(_acc_dtype(hidden.dtype)) / temperature  # [N, V]
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """hidden [N, H], weight [V, H] -> entropy of softmax(hidden @ weight.T / temperature) [N]."""
    logp = ((hidden @ weight.T).to(_acc_dtype(hidden.dtype)) / temperature).log_softmax(-1)  # [N, V]
    return -(logp.exp() * logp).sum(-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def logits_stats_reference(
    logits: torch.Tensor, t: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits [c, V] (the head GEMM's output), t [c] -> (lse, log p(t), entropy or None) [c] each, of
    softmax(logits / T), float32 or wider."""
    x = logits.to(_acc_dtype(logits.dtype)) / temperature  # [c, V]
    lse = x.logsumexp(-1)  # [c]
    logp = x.gather(1, t[:, None]).squeeze(1) - lse
    # H = lse - sum_v p_v * logit_v, from the same chunk of logits
    entropy = lse - (x - lse[:, None]).exp().mul_(x).sum(-1) if with_entropy else None
    return lse, logp, entropy


def logits_grad_reference(
    logits: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor | None, temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d(sum_n -scale_n * log p_n(t_n)) / d logits [c, V] in `dtype`: scale[:, None] * (softmax(logits / T)
    - onehot(t)) / T; scale None: 1 (with T 1: the cross-entropy's softmax - onehot)."""
    probs = (logits.to(_acc_dtype(logits.dtype)) / temperature - lse[:, None]).exp_()  # [c, V]
    if scale is None:
        return probs.scatter_add_(1, t[:, None], -torch.ones_like(lse)[:, None]).to(dtype)
    g = scale[:, None].to(probs.dtype)  # d logp(t) / d logits = (onehot(t) - p) / T, times the gradient
    return (probs.mul_(-g).scatter_add_(1, t[:, None], g) / temperature).to(dtype)


def logits_stats(logits, t, temperature: float, with_entropy: bool = False):
    """As logits_stats_reference; on CUDA one Triton pass over the logits in their own dtype."""
    if not triton_ready(logits):
        return logits_stats_reference(logits, t, temperature, with_entropy)
    return row_stats_triton(logits, t, temperature, with_entropy)


def logits_grad(logits, t, lse, scale, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """As logits_grad_reference; on CUDA one Triton pass that overwrites the logits with their gradient
    (in the logits' dtype: the GEMM that takes it reads that dtype)."""
    if not triton_ready(logits):
        return logits_grad_reference(logits, t, lse, scale, temperature, dtype)
    return row_grad_triton(logits, t, lse, scale, temperature)


def row_stats_triton(logits: torch.Tensor, t: torch.Tensor, temperature: float, with_entropy: bool = False):
    """logits [c, V] (any float dtype, unit last stride), t [c] -> (lse, log p(t), entropy or None), float32."""
    from align.kernels import linear_logprob_triton  # Triton only where the kernels run

    require_contiguous_last_dim("row_stats", logits=logits)
    rows, vocab = logits.shape
    lse, logp = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    entropy = torch.empty_like(lse) if with_entropy else lse
    if rows:
        linear_logprob_triton.row_stats_kernel[(rows,)](
            logits, logits.stride(0), t.contiguous(), lse, logp, entropy, vocab, float(temperature),
            ENTROPY=with_entropy, BLOCK=min(BLOCK, pow2_block(vocab)), num_warps=8,
        )
    return lse, logp, entropy if with_entropy else None


def row_grad_triton(
    logits: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """In place: logits [c, V] <- logits_grad_reference's value, in the logits' dtype."""
    from align.kernels import linear_logprob_triton  # Triton only where the kernels run

    require_contiguous_last_dim("row_grad", logits=logits)
    rows, vocab = logits.shape
    if scale is None:
        scale = torch.ones(rows, dtype=torch.float32, device=logits.device)
    else:
        scale = (-scale.float() / temperature).contiguous()  # (p - onehot) * (-g / T) = (onehot - p) * g / T
    if rows:
        linear_logprob_triton.row_grad_kernel[(rows,)](
            logits, logits.stride(0), t.contiguous(), lse.float().contiguous(), scale, vocab, float(temperature),
            BLOCK=min(BLOCK, pow2_block(vocab)), num_warps=8,
        )
    return logits


@functools.cache
def _addmm_accumulates(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm with a float32 output accumulates 16-bit products in place here (probed once)."""
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        acc = torch.ones(16, 16, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((acc == 17).all())


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc [m, n] float32 or wider, a [m, k], b [k, n]. 16-bit products on CUDA accumulate
    inside the GEMM (addmm's float32 output, beta 1): no [m, n] product to cast and add, which for a
    trainable LM head (m, n = vocab, hidden) is two passes over its gradient per chunk."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype != acc.dtype and \
            _addmm_accumulates(acc.device, a.dtype):
        with torch.autocast("cuda", enabled=False):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    acc += (a @ b).to(acc.dtype)


class LinearLogprobs(torch.autograd.Function):
    """The backward runs under the forward's autocast state (custom_fwd / custom_bwd), so mixed dtypes
    that autocast reconciled in the forward (float32 hidden states, bf16 head) meet the same casts."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy=False):
        out = torch.empty(hidden.shape[0], dtype=_acc_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(out)
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            logits = hidden[sl] @ weight.T  # [c, V]
            lse[sl], out[sl], chunk_entropy = logits_stats(logits, targets[sl], temperature, with_entropy)
            if with_entropy:
                entropy[sl] = chunk_entropy
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _acc_dtype(hidden.dtype)
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            # d logp(t) / d logits = (onehot(t) - p) / T, scaled by the incoming gradient
            logits = h @ weight.T  # [c, V]
            grad_logits = logits_grad(logits, targets[sl], lse[sl], grad_out[sl], temperature, h.dtype)
            if grad_hidden is not None:
                grad_hidden[sl] = grad_logits @ weight
            if grad_weight is not None:
                add_product_(grad_weight, grad_logits.T, h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class LinearNLLSum(torch.autograd.Function):
    """sum_n -log softmax(hidden[n] @ weight.T)[targets[n]], its gradients computed in the forward
    (where `grads` asks: they need the inputs' requires_grad and grad mode, known only outside)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, chunk, grads):
        want_hidden, want_weight = grads
        acc = _acc_dtype(hidden.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h, t = hidden[sl], targets[sl]
            logits = h @ weight.T  # [c, V]
            lse, logp, _ = logits_stats(logits, t, 1.0)  # [c] each
            total -= logp.sum()
            if want_hidden or want_weight:  # d(-log p_t) / d logits = softmax - onehot(t)
                grad_logits = logits_grad(logits, t, lse, None, 1.0, h.dtype)  # [c, V]
                if want_hidden:
                    grad_hidden[sl] = grad_logits @ weight
                if want_weight:
                    add_product_(grad_weight, grad_logits.T, h)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.grads = grads
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_total):
        kept = list(ctx.saved_tensors)
        grad_hidden = kept.pop(0) * grad_total if ctx.grads[0] else None
        grad_weight = kept.pop(0) * grad_total if ctx.grads[1] else None
        return grad_hidden, grad_weight, None, None, None


def linear_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK):
    """hidden [N, H], weight [V, H], targets [N] -> sum_n -log p(targets[n]) (float32 or wider), with the
    gradients (of what requires one, in grad mode) taken in the forward chunk by chunk."""
    on = torch.is_grad_enabled()
    grads = (on and hidden.requires_grad, on and weight.requires_grad)
    return LinearNLLSum.apply(hidden, weight, targets, chunk, grads)


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """hidden [..., H], weight [V, H], targets [...] -> log p(target) [...] float32."""
    return linear_logprobs_entropy(hidden, weight, targets, temperature, chunk, with_entropy=False)[0]


def linear_logprobs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    chunk: int = CHUNK, with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [...], entropy of softmax(logits / temperature) [...] without gradient), float32.
    The entropy costs one more pass over each chunk's logits in the forward, nothing in the backward."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = LinearLogprobs.apply(flat, weight, targets.reshape(-1), temperature, chunk, with_entropy)
    return logp.view(shape), entropy.view(shape) if with_entropy else entropy


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Causal-LM loss from final hidden states [B, S, H] and unshifted labels [B, S]: the mean (or the
    sum over `num_items_in_batch`) of -log p(labels[t+1] | ..t), as transformers' ForCausalLMLoss;
    gradients taken in the forward (linear_nll_sum)."""
    index, targets = trained_positions(labels, ignore_index)
    total = linear_nll_sum(hidden.flatten(0, 1).index_select(0, index), weight, targets)  # [n] tokens -> scalar
    denom = num_items_in_batch if num_items_in_batch is not None else max(index.numel(), 1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


def trained_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, S] -> (flat indices into B*S of the positions whose next label is trained [n], those
    labels [n]): position t predicts label t + 1."""
    targets = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1)  # [B*S], shifted left
    index = (targets != ignore_index).nonzero().squeeze(1)  # [n]
    return index, targets[index]
