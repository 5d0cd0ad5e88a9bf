"""Atomic training checkpoints and exact resume.

Layout of `<run_dir>/checkpoints/step-000100/`:
    adapter/             LoRA runs: a PEFT adapter directory (adapter_config.json +
                         adapter_model.safetensors), loadable with peft onto transformers' DeepseekV2
    model/               full fine-tuning: a hub-layout checkpoint (config.json + safetensors) + tokenizer
    esft/                ESFT: trainable.safetensors (the trained slices by parameter name, applied to the
                         recipe's base on resume), esft_experts.json (the choice, reused), tokenizer
    optimizer.safetensors  AdamW state tensors by parameter name, unsharded (any world size / mode
    optimizer.json         can resume), and the param groups / which tensors each parameter has
    scheduler.json         LambdaLR state
    rng/rank-<r>.json      python / numpy / torch (/ CUDA) RNG states of each process
    recipe.yaml            the recipe that wrote it (resume checks the new recipe against it)
    trainer_state.json     step, rows consumed (the data position), world size, total steps

Nothing in a checkpoint is unpickled: tensors are safetensors, the rest JSON / YAML, so a crafted
checkpoint directory cannot run code on resume (FSDP2 runs gather the full optimizer state into the
same files). A malformed file is a CheckpointError naming it. Checkpoints of earlier versions
(optimizer.pt & co., pickles) are refused, not loaded.

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
from safetensors.torch import load_file, save_file

from align.models.checkpoint import CheckpointError, replace_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RECIPE_FILE = "recipe.yaml"
PICKLED = ("optimizer.pt", "scheduler.pt")  # the earlier format: never loaded
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


# ---------------------------------------------------------------------------------- JSON files


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


def read_json(path: Path, what: str) -> object:
    """A JSON file of a checkpoint; a missing or malformed one is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (expected {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a JSON file ({err}); expected {what}") from err


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    """Every RNG stream of this process as plain JSON data."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_rng_file(path: Path) -> None:
    state = read_json(path, "RNG states")
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a valid RNG state ({type(err).__name__}: {err})") from err


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


def save_optimizer_files(state: dict, out: Path) -> None:
    """optimizer.safetensors (tensor `<param>/<key>`) + optimizer.json (param groups, layout, scalars)."""
    tensors, layout = {}, {}
    for name, entries in state["state"].items():
        layout[name] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
                layout[name][key] = None  # None: the tensor `<name>/<key>` of optimizer.safetensors
            elif isinstance(value, int | float) and not isinstance(value, bool):
                layout[name][key] = value
            else:
                raise TypeError(f"optimizer state {name!r}/{key!r}: cannot store {type(value).__name__}")
    save_file(tensors, out / OPTIMIZER_TENSORS)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    write_json(out / OPTIMIZER_FILE, {"state": layout, "param_groups": groups})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign / truncated files
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err


def load_optimizer_files(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """The state save_optimizer_files wrote, shaped as get_optimizer_state_dict returns it."""
    meta, tensors = read_json(path / OPTIMIZER_FILE, "optimizer param groups"), _tensors(path / OPTIMIZER_TENSORS)
    tuples = {k for k, v in optimizer.param_groups[0].items() if isinstance(v, tuple)}  # betas
    try:
        state = {name: {key: tensors[f"{name}/{key}"] if value is None else value for key, value in entries.items()}
                 for name, entries in meta["state"].items()}
        groups = [{k: tuple(v) if k in tuples else v for k, v in g.items()} for g in meta["param_groups"]]
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not match {OPTIMIZER_TENSORS} "
                              f"({type(err).__name__}: {err})") from err
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------- save / restore


def save_training_state(tmp: Path, model, optimizer, scheduler, state: dict, accelerator, recipe_text: str) -> None:
    """Everything but the weights: optimizer, scheduler, RNG of every process, recipe, trainer state."""
    optim = optimizer_state(model, optimizer)
    (tmp / "rng").mkdir(exist_ok=True)
    write_json(tmp / "rng" / f"rank-{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:
        save_optimizer_files(optim, tmp)
        write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        (tmp / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
        write_json(tmp / STATE_FILE, state)


def read_trainer_state(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint (refusing the earlier pickle format)."""
    path = Path(path)
    pickled = [name for name in PICKLED if (path / name).exists()]
    if pickled and not (path / OPTIMIZER_FILE).exists():
        raise CheckpointError(
            f"{path}: written in the earlier pickle format ({', '.join(pickled)}), which align no longer loads "
            f"(unpickling can run code); start the run again (output.overwrite=true) or resume a newer checkpoint"
        )
    state = read_json(path / STATE_FILE, "the trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{path / STATE_FILE}: expected an object with a non-negative integer 'step'")
    return state


def load_scheduler_file(path: Path, scheduler) -> None:
    state, known = read_json(path, "the LR scheduler state"), scheduler.state_dict()
    if not isinstance(state, dict) or set(state) != set(known):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected the keys {sorted(known)}, got {keys}")
    wrong = [k for k, v in known.items() if v is not None and type(state[k]) is not type(v)]
    if wrong:
        expected = [type(known[k]).__name__ for k in wrong]
        raise CheckpointError(f"{path}: wrong value types for {wrong} (expected {expected})")
    scheduler.load_state_dict(state)


def restore_training_state(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Load optimizer / scheduler / RNG from a checkpoint; returns its trainer state."""
    state = read_trainer_state(path)
    optim = load_optimizer_files(path, optimizer)
    try:
        load_optimizer_state(model, optimizer, optim)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit this model's trainable parameters "
                              f"({type(err).__name__}: {err})") from err
    load_scheduler_file(path / SCHEDULER_FILE, scheduler)
    rank_file = path / "rng" / f"rank-{accelerator.process_index}.json"
    if not rank_file.is_file():  # a different world size: fall back to rank 0's streams
        rank_file = path / "rng" / "rank-0.json"
    load_rng_file(rank_file)
    return state


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> None:
    if keep is None or keep < 1:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
