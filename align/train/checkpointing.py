"""Atomic training checkpoints and exact resume.

Layout of `<run_dir>/checkpoints/step-000100/`:
    adapter/             LoRA runs: a PEFT adapter directory (adapter_config.json +
                         adapter_model.safetensors), loadable with peft onto transformers' DeepseekV2
    model/               full fine-tuning: a hub-layout checkpoint (config.json + safetensors) + tokenizer
    optimizer.pt         AdamW state by parameter name, unsharded (any world size / mode can resume)
    scheduler.pt         LambdaLR state
    rng/rank-<r>.pt      python / numpy / torch (/ CUDA) RNG states of each process
    trainer_state.json   step, rows consumed (the data position), world size, total steps

Every directory is written under a temporary name and renamed into place when complete
(align.models.checkpoint.replace_dir), so an interrupted save leaves no partial checkpoint.
`<run_dir>/final/` (merged full checkpoint + tokenizer) is written the same way.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from align.models.checkpoint import replace_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume(resume_from: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a directory, or 'latest' (None when the run has none yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from {resume_from!r}: not a training checkpoint (no {STATE_FILE}); expected a "
            f"directory like {checkpoint_dir(run_dir, 100)} or 'latest'"
        )
    return path


@contextmanager
def atomic_dir(out: str | Path, accelerator) -> Iterator[Path]:
    """Yield a temporary directory that every process may write into; renamed to `out` at the end."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        yield tmp
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, out)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------- model weights


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict; with FSDP a collective, complete on the main process only."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter(peft_model, out: Path, base_path: str | None) -> None:
    """The PEFT adapter directory; `base_path` recorded as base_model_name_or_path."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_path
    peft_model.save_pretrained(str(out))


def load_adapter_weights(peft_model, adapter_dir: str | Path) -> None:
    from peft import set_peft_model_state_dict

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{adapter_dir}: adapter tensors this model has no place for: {unexpected[:8]}")


# ------------------------------------------------------------------------------ optimizer state


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """Without a DDP wrapper (its `module.` prefix would leak into parameter names)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def optimizer_state(model, optimizer) -> dict:
    """AdamW state keyed by parameter names, unsharded: resumable by any world size and mode
    (a collective under FSDP: every process calls it; complete on the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(_bare(model), optimizer, options=options)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(_bare(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------- save / restore


def save_training_state(tmp: Path, model, optimizer, scheduler, state: dict, accelerator) -> None:
    """Everything but the weights: optimizer, scheduler, RNG of every process, trainer state."""
    optim = optimizer_state(model, optimizer)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def restore_training_state(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Load optimizer / scheduler / RNG from a checkpoint; returns its trainer state."""
    state = read_trainer_state(path)
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    load_optimizer_state(model, optimizer, optim)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rank_file = path / "rng" / f"rank-{accelerator.process_index}.pt"
    if not rank_file.is_file():  # a different world size: fall back to rank 0's streams
        rank_file = path / "rng" / "rank-0.pt"
    set_rng_state(torch.load(rank_file, weights_only=False))
    return state


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> None:
    if keep is None or keep < 1:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
