"""GRPO clipped-surrogate loss with a k3 KL term, defined as TRL 1.16's ``GRPOTrainer._compute_loss``.

Inputs are per-token log-probabilities of the completion tokens, ``[B, T]`` (already divided by
the sampling temperature before the log-softmax), and a ``[B, T]`` completion mask. Notation:

- ``ρ = exp(logπθ − logπold)``: token level, one ratio per token; sequence level (GSPO), one per
  sequence, ``ρ_i = exp(Σ_t m_it (logπθ − logπold)_it / max(Σ_t m_it, 1))``.
- ``ℓ = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·KL``, where ``ρ`` in the unclipped branch is
  first capped at ``δ`` when ``delta`` is set (two-sided clipping, INTELLECT-2).
- ``KL = exp(ref − logπθ) − (ref − logπθ) − 1`` (k3), times ``ρ`` when ``use_bias_correction_kl``.
- cispo (MiniMax-M1): ``ℓ = −sg(min(ρ, ε_high))·Â·logπθ`` (``epsilon_high`` is the absolute cap ε_max);
  sapo (soft adaptive): ``ℓ = −σ(τ(ρ − 1))·4/τ·Â`` with ``τ = sapo_temperature_pos`` where ``Â > 0``,
  else ``sapo_temperature_neg``. Both then aggregate as dapo (cispo) or grpo (sapo), as TRL does.
- ``top_entropy_quantile`` q < 1: the policy term keeps only tokens whose entropy is at least the
  (1 − q) quantile of the batch's masked entropies (Beyond the 80/20 Rule); the KL term is kept.

Everything else TRL 1.16 layers on top (vLLM importance correction, off-policy sequence masks,
entropy bonus, luspo/vespo) is not part of this module; the MoE balance loss is added by the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Loss options, named and defaulted as in ``trl.GRPOConfig`` 1.16.

    ``epsilon`` is ε_low; ``epsilon_high`` defaults to ``epsilon``. ``delta`` caps the unclipped
    ratio (``None``: off). ``max_completion_length`` is the ``dr_grpo`` constant. ``sapo_temperature_*``:
    the sapo gate's sharpness; ``top_entropy_quantile``: share of tokens (by entropy) the policy term keeps.
    """

    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: LossType = "dapo"
    importance_sampling_level: ImportanceSamplingLevel = "token"
    max_completion_length: int = 512
    use_bias_correction_kl: bool = True
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    top_entropy_quantile: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        if self.beta < 0 or self.epsilon < 0 or self.eps_high < 0:
            raise ValueError(f"beta, epsilon and epsilon_high must be >= 0, got {self}")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.sapo_temperature_neg <= 0 or self.sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_neg / _pos must be > 0, got {self}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")

    @property
    def eps_low(self) -> float:
        return self.epsilon

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(πθ ‖ πref): ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def log_importance_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """``log ρ``: ``logπθ − logπold`` as ``[B, T]`` (token level) or its ``[B, 1]`` masked mean (sequence)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


def clipped_surrogate(coef: Tensor, advantages: Tensor, cfg: GRPOLossConfig) -> tuple[Tensor, Tensor]:
    """``−min(ρ'·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â)`` with ``ρ' = min(ρ, δ)`` (``ρ' = ρ`` without δ).

    Returns the per-token loss and ``ρ'`` (the ratio TRL's clip metrics look at).
    """
    clipped = torch.clamp(coef, 1 - cfg.eps_low, 1 + cfg.eps_high)
    if cfg.delta is not None:
        coef = torch.clamp(coef, max=cfg.delta)
    return -torch.min(coef * advantages, clipped * advantages), coef


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    num_items_in_batch: Tensor | float | None = None,
    grad_accum_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
) -> Tensor:
    """Reduce ``ℓ·m`` to the micro-batch loss; ``n_i = Σ_t m_it``, ``GA = grad_accum_steps``.

    - grpo, sapo: ``mean_i(Σ_t ℓ_it m_it / max(n_i, 1)) / GA``
    - bnpo: ``Σ ℓ·m / max(Σ n_i, 1) / GA``
    - dr_grpo: ``Σ ℓ·m / (B · max_completion_length) / GA``
    - dapo, cispo: ``Σ ℓ·m / (max(N, 1) / num_processes · GA / steps_per_generation)`` with
      ``N = num_items_in_batch``, the loss-token count of the whole generation batch (all
      processes); ``steps_per_generation`` defaults to ``GA``, making the normaliser ``N / P``.

    Summing the micro-batch losses of one optimizer step (and averaging over data-parallel
    processes) gives the step's objective, as in TRL's training mode. Evaluation: GA = SPG = 1.
    """
    masked = per_token_loss * mask
    if cfg.loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = masked.sum() / (per_token_loss.size(0) * cfg.max_completion_length)
    else:  # dapo, cispo
        return masked.sum() / _dapo_normaliser(
            num_items_in_batch, grad_accum_steps, steps_per_generation, num_processes, mask
        )
    return loss / grad_accum_steps


def _dapo_normaliser(
    num_items_in_batch: Tensor | float | None,
    grad_accum_steps: int,
    steps_per_generation: int | None,
    num_processes: int,
    mask: Tensor,
) -> Tensor:
    if num_items_in_batch is None:
        raise ValueError(
            "loss_type 'dapo' / 'cispo' needs num_items_in_batch: the number of loss tokens (mask sum) in the whole "
            "generation batch, over all processes and accumulation steps"
        )
    spg = grad_accum_steps if steps_per_generation is None else steps_per_generation
    n = torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
    return n / num_processes * grad_accum_steps / spg


def clip_metrics(coef: Tensor, advantages: Tensor, mask: Tensor, cfg: GRPOLossConfig) -> dict[str, Tensor]:
    """Clip fractions under TRL's metric names (local batch; TRL sums numerators and counts over processes).

    low: ``ρ' < 1 − ε_low`` and ``Â < 0``; high: ``ρ' > 1 + ε_high`` and ``Â > 0``; region: either.
    ``*_mean``: masked token mean (sequence level: mean over all ``B`` sequences, masked or not).
    ``low_min`` / ``high_max``: min / max over sequences of the per-sequence mean, NaN rows skipped.
    """
    low = ((coef < 1 - cfg.eps_low) & (advantages < 0)).to(mask.dtype)
    high = ((coef > 1 + cfg.eps_high) & (advantages > 0)).to(mask.dtype)
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": _global_masked_mean(low, mask),
        "clip_ratio/high_mean": _global_masked_mean(high, mask),
        "clip_ratio/region_mean": _global_masked_mean(region, mask),
        "clip_ratio/low_min": _nan_reduce(_masked_seq_mean(low, mask), torch.min),
        "clip_ratio/high_max": _nan_reduce(_masked_seq_mean(high, mask), torch.max),
    }


def _global_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Masked token mean of a ``[B, T]`` value; plain mean over sequences of a ``[B, 1]`` one."""
    if x.shape != mask.shape:
        return x.sum() / max(x.size(0), 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    if x.shape != mask.shape:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _nan_reduce(x: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    kept = x[~torch.isnan(x)]
    return reduce(kept) if kept.numel() else x.new_tensor(float("nan"))


def policy_loss(logps: Tensor, coef: Tensor, advantages: Tensor, cfg: GRPOLossConfig) -> tuple[Tensor, Tensor]:
    """Per-token policy term of the loss type, and the ratio its metrics look at (see the module doc)."""
    if cfg.loss_type == "cispo":
        return -torch.clamp(coef, max=cfg.eps_high).detach() * advantages * logps, coef
    if cfg.loss_type == "sapo":
        tau = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        return -torch.sigmoid(tau * (coef - 1)) * 4 / tau * advantages, coef
    return clipped_surrogate(coef, advantages, cfg)


def ratio_metrics(coef: Tensor, advantages: Tensor, mask: Tensor, cfg: GRPOLossConfig) -> dict[str, Tensor]:
    """TRL's ratio metrics of the loss type: clip_ratio/* (clipped surrogates), cispo_clip_ratio, none (sapo)."""
    if cfg.loss_type == "cispo":
        clipped = ((coef > cfg.eps_high) & (advantages > 0)).to(mask.dtype)
        return {"cispo_clip_ratio": _global_masked_mean(clipped, mask)}
    if cfg.loss_type == "sapo":
        return {}
    return clip_metrics(coef, advantages, mask, cfg)


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """1 on the masked tokens whose entropy is at least the (1 − quantile) quantile of the masked
    entropies (the top `quantile` share by entropy), else 0; all 0 when the mask is empty."""
    kept = entropies[mask.bool()].float()
    if kept.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(kept, 1 - quantile)
    return ((entropies * mask >= threshold) & mask.bool()).to(mask.dtype)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    cfg: GRPOLossConfig,
    num_items_in_batch: Tensor | float | None = None,
    *,
    grad_accum_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO micro-batch loss and its metrics (detached 0-dim tensors, TRL's names).

    ``logps``: ``[B, T]`` policy log-probs with grad. ``old_logps``: log-probs under the policy
    that sampled (``μ > 1`` or stale batches); ``None`` means on-policy, ``logps.detach()``.
    ``ref_logps``: reference log-probs, required when ``beta > 0``; when given with ``beta == 0``
    the KL is only logged. ``advantages``: ``[B]`` or ``[B, T]``. ``num_items_in_batch``: dapo's
    token count (see :func:`aggregate_loss`, which also documents the keyword-only scaling).
    ``entropies``: ``[B, T]`` policy entropies, required when ``top_entropy_quantile < 1``.

    Metrics: ``kl`` (masked mean of the β-term's KL, when ``ref_logps`` is given) and the ratio
    metrics of :func:`ratio_metrics`.
    """
    mask = _check_inputs(logps, old_logps, ref_logps, advantages, completion_mask, cfg)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = logps.detach() if old_logps is None else old_logps
    coef = torch.exp(log_importance_weights(logps, old_logps, mask, cfg.importance_sampling_level))
    per_token_loss, ratio = policy_loss(logps, coef, advantages, cfg)
    metrics = ratio_metrics(ratio.detach(), advantages, mask, cfg)
    if cfg.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError(f"top_entropy_quantile={cfg.top_entropy_quantile} needs the policy's entropies")
        per_token_loss = per_token_loss * high_entropy_mask(entropies.detach(), mask, cfg.top_entropy_quantile)
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        if cfg.use_bias_correction_kl:
            kl = kl * coef
        if cfg.beta != 0.0:
            per_token_loss = per_token_loss + cfg.beta * kl
        metrics["kl"] = _global_masked_mean(kl.detach(), mask)
    loss = aggregate_loss(
        per_token_loss, mask, cfg, num_items_in_batch, grad_accum_steps, steps_per_generation, num_processes
    )
    return loss, metrics


def _check_inputs(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    cfg: GRPOLossConfig,
) -> Tensor:
    """Validate shapes and the β/reference pairing; return the mask in ``logps``' dtype."""
    if logps.dim() != 2:
        raise ValueError(f"logps must be [batch, completion_len], got shape {tuple(logps.shape)}")
    named = {"completion_mask": completion_mask, "old_logps": old_logps, "ref_logps": ref_logps}
    for name, t in named.items():
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logps' shape {tuple(logps.shape)}")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"advantages must be [B] or [B, T] for logps {tuple(logps.shape)}, got {tuple(advantages.shape)}"
        )
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={cfg.beta} adds a KL term to the reference: pass ref_logps (or set beta=0)")
    return completion_mask.to(logps.dtype)


def mask_truncated_completions(
    completion_ids: Tensor,
    completion_mask: Tensor,
    eos_token_ids: Iterable[int],
    pad_token_id: int | None = None,
) -> Tensor:
    """Zero the mask rows of completions that were cut at the length limit.

    A completion is kept when its last unmasked token is an EOS id (or ``pad_token_id``, which
    TRL also accepts); masks are right-padded. Empty completions are left as they are (all zero).
    The returned mask also belongs in the attention mask, as TRL uses it there.
    """
    stop_ids = [*eos_token_ids, *([] if pad_token_id is None else [pad_token_id])]
    lengths = completion_mask.sum(-1)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).long().unsqueeze(1)).squeeze(1)
    stop = torch.tensor(stop_ids, dtype=completion_ids.dtype, device=completion_ids.device)
    ended = torch.isin(last, stop) | (lengths == 0)
    return completion_mask * ended.unsqueeze(1).to(completion_mask.dtype)
