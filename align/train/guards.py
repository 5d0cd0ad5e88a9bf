"""Stopping a run that has gone wrong: every process decides alike, and the error names the step.

- An optimizer step whose loss or gradient norm is NaN / inf is not applied (the weights stay as they
  were, the schedule moves on); past `train.max_nonfinite_steps` such steps the run stops.
- Trainable weights are checked before every checkpoint, so a NaN / inf checkpoint is never written.
- A GRPO round in which no reward gave a value (each raised or returned None for every completion) is
  a warning; `grpo.max_failed_reward_steps` such rounds in a row stop the run.

A stop is a TrainingStopped error: the CLI prints its message and exits 1. What was saved before it
(checkpoints, metrics) stays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from align.train import checkpointing as ckpt
from align.train.errors import TrainingStopped

__all__ = ["NonFiniteGuard", "RewardGuard", "TrainingStopped", "any_flag", "any_nonfinite", "weights_finite"]


def any_flag(flag: bool, accelerator) -> bool:
    """Whether `flag` is set on any process (an all-reduce, so every process gets the same answer)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def any_nonfinite(values: torch.Tensor, accelerator) -> bool:
    """Whether any of `values` is NaN or inf on any process."""
    return any_flag(not bool(torch.isfinite(values.detach()).all()), accelerator)


def weights_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether every trainable weight is finite on every process (FSDP2: each checks its shards)."""
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    for param in model.parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            bad |= ~torch.isfinite(local.detach()).all().to(bad.device)  # one host sync at the end, not per weight
    return not any_flag(bool(bad), accelerator)


def newest_checkpoint(run_dir: str | Path) -> str:
    saved = ckpt.list_checkpoints(run_dir)
    return f"newest checkpoint: {saved[-1]}" if saved else "no checkpoint was saved"


def require_finite_weights(model: torch.nn.Module, accelerator, step: int, run_dir: str | Path) -> None:
    """Before writing a checkpoint of `step`: a TrainingStopped error when a trainable weight is NaN / inf."""
    if not weights_finite(model, accelerator):
        raise TrainingStopped(
            f"step {step}: the trained weights hold NaN / inf values (the last update diverged); nothing was "
            f"written for this step ({newest_checkpoint(run_dir)}); lower optim.lr or set train.max_grad_norm"
        )


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for a NaN / inf loss or gradient norm; stops past `limit`."""

    limit: int
    run_dir: str | Path
    count: int = 0

    def skipped(self, step: int, values: Mapping[str, float]) -> str:
        """Record skipped step `step`; returns the warning to print, or raises TrainingStopped."""
        self.count += 1
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        if self.count > self.limit:
            raise TrainingStopped(
                f"step {step}: not finite ({shown}); the update was not applied and the run stops ({self.count} "
                f"such step(s), train.max_nonfinite_steps={self.limit}); {newest_checkpoint(self.run_dir)}. Lower "
                f"optim.lr, set train.max_grad_norm, or allow skipped steps with train.max_nonfinite_steps"
            )
        return (f"warning: step {step}: not finite ({shown}); the update was skipped "
                f"({self.count} of {self.limit} allowed by train.max_nonfinite_steps)")


def reward_failure(per_function: Mapping[str, Sequence[float | None]], errors: Mapping[str, int]) -> str | None:
    """Why a round has no reward signal (every reward raised or returned only None), or None when it has one."""
    if any(v is not None and not math.isnan(v) for values in per_function.values() for v in values):
        return None
    return "; ".join(f"{name} raised" if errors.get(name) else f"{name} returned None for all {len(values)}"
                     for name, values in per_function.items())


@dataclass
class RewardGuard:
    """Rounds in a row without any reward value; stops at `limit`."""

    limit: int
    streak: int = 0

    def record(self, step: int, failure: str | None) -> str | None:
        """Returns a warning for a failed round (None for a good one), or raises TrainingStopped."""
        if failure is None:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak >= self.limit:
            raise TrainingStopped(
                f"step {step}: no reward gave a value for {self.streak} round(s) in a row ({failure}); the run stops "
                f"(grpo.max_failed_reward_steps={self.limit}). Check the reward functions and the dataset columns "
                f"they read"
            )
        return (f"warning: step {step}: no reward gave a value ({failure}); all advantages are 0 this round "
                f"({self.streak} in a row; the run stops at grpo.max_failed_reward_steps={self.limit})")
