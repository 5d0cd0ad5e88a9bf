"""Whose run a run directory holds: a fresh run starts in an empty one, a resumed run continues its own.

- A fresh run (no `resume_from`, or a checkpoint of another directory) needs an empty or new
  `output.run_dir`; `output.overwrite=true` deletes an earlier run there first. Only a directory that
  holds an align run is ever deleted (never the working directory or one of its parents).
- `resume_from=latest` continues the newest checkpoint of run_dir; with none yet, it restarts an
  earlier attempt of the same recipe that stopped before its first checkpoint.
- Resuming compares the checkpoint's recipe.yaml with the current recipe: a changed model, tokenizer,
  data, LoRA shape, optimizer or train.seed is an error naming every changed key (the weights, data
  order and restored optimizer state would not belong together); other changes are listed and apply.
- A fresh run that fails before training starts removes what it wrote, so the directory is as before;
  `<run_dir>/recipe.yaml` is written once the run is set up (run.write_recipe).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.models.checkpoint import CheckpointError
from align.recipe import RecipeError, load_recipe, to_dict
from align.train import checkpointing as ckpt

RECIPE = "recipe.yaml"
RUN_ENTRIES = {RECIPE, "metrics.jsonl", "completions.jsonl", ckpt.CHECKPOINTS, "final", "base", "data", "plots",
               "esft_experts.json"}
# keys that must match to resume: the checkpoint's weights, data order and optimizer state depend on them
MUST_MATCH = ("model", "tokenizer", "data", "lora", "esft", "rm", "optim", "train.seed")
MAY_CHANGE = ("lora.dropout",)
IGNORED = ("output", "resume_from")


@dataclass
class RunDir:
    path: Path
    resume: Path | None  # the checkpoint this run continues
    fresh: bool  # this run started the directory (it removes it again when setup fails)
    notes: list[str]  # changed recipe keys of a resumed run


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe as {dotted key: value}; lists are values, an absent optional section is key: None."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _toggled(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Sections null or empty on one side and set on the other (lora, model.config)."""
    return {key for one, two in ((before, after), (after, before)) for key, value in one.items()
            if value in (None, {}) and any(k.startswith(key + ".") for k in two)}


def _section(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _same(a: Any, b: Any) -> bool:
    """Equal values; paths written relative and absolute (the saved recipe resolves them) are equal too."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def recipe_changes(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """(changes that forbid resuming, other changes), each 'key: old -> new'."""
    old_tree, new_tree = to_dict(old), to_dict(new)
    before, after = flatten(old_tree), flatten(new_tree)
    toggled = _toggled(before, after)
    lines = {key: f"{key}: {_section(old_tree, key)!r} -> {_section(new_tree, key)!r}" for key in toggled}
    for key in sorted(set(before) | set(after)):
        if _under(key, IGNORED) or _under(key, tuple(toggled)) or _same(before.get(key), after.get(key)):
            continue
        lines[key] = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
    blocking, other = [], []
    for key in sorted(lines):
        (blocking if _under(key, MUST_MATCH) and not _under(key, MAY_CHANGE) else other).append(lines[key])
    return blocking, other


def check_resume_recipe(source: Path, recipe: Any, what: str) -> list[str]:
    """The changed keys of `recipe` against the recipe file `source` (a checkpoint's, or an earlier
    attempt's); an error when the model, data or optimizer differ."""
    if not source.is_file():
        raise CheckpointError(f"{source}: missing; cannot check that {what} belongs to this recipe")
    try:
        old = load_recipe(type(recipe), source)
    except (RecipeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{source}: not a recipe this version can read ({err})") from err
    blocking, other = recipe_changes(old, recipe)
    if blocking:
        must = ", ".join(MUST_MATCH)
        raise ValueError(
            f"{what} was trained with another recipe ({source}): {'; '.join(blocking)}. These keys ({must}) must "
            f"stay the same to resume; to start a new run, use another output.run_dir or output.overwrite=true"
        )
    return other


def _protected(path: Path) -> bool:
    here, target = Path.cwd().resolve(), path.resolve()
    return target == here or target in here.parents or target == Path.home().resolve()


def _holds_run(path: Path, entries: list[str]) -> bool:
    known = RUN_ENTRIES | {path.name}  # accelerate trackers log under <run_dir>/<run_dir name>
    return RECIPE in entries or ckpt.CHECKPOINTS in entries or all(e in known or e.startswith(".") for e in entries)


def _occupied_error(path: Path, entries: list[str]) -> ValueError:
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not _holds_run(path, entries) or _protected(path):
        return ValueError(f"output.run_dir '{path}' is not empty ({shown}) and does not hold an align run; "
                          f"choose a new or empty output.run_dir")
    saved = ckpt.list_checkpoints(path)
    last = f" (newest checkpoint: {saved[-1].name})" if saved else ""
    return ValueError(
        f"output.run_dir '{path}' already holds a run ({shown}){last}. Add output.overwrite=true to delete it "
        f"and start over, or resume_from=latest to continue it"
    )


def claim(path: Path, recipe: Any, accelerator) -> bool:
    """Make `path` ready for a run that starts there: an error when it holds something, unless the
    recipe allows clearing it (output.overwrite, or resume_from=latest restarting the same recipe).
    Returns whether an earlier run was deleted."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output.run_dir '{path}' is a file; expected a directory")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries:
        return False
    if _protected(path) or not _holds_run(path, entries):
        raise _occupied_error(path, entries)
    if recipe.resume_from == "latest" and (path / RECIPE).is_file():
        # an earlier attempt of this recipe that stopped before its first checkpoint: start it again
        check_resume_recipe(path / RECIPE, recipe, f"the earlier run in {path}")
    elif not recipe.output.overwrite:
        raise _occupied_error(path, entries)
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if accelerator.is_main_process:
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return True


def open_run_dir(recipe: Any, accelerator) -> tuple[RunDir, str | None]:
    """The run directory of `recipe`, checked (and cleared when asked); returns it and a line to print."""
    path = Path(recipe.output.run_dir)
    resume = ckpt.resolve_resume(recipe.resume_from, path)
    own = resume is not None and path.resolve() in resume.resolve().parents
    if own and recipe.output.overwrite:
        raise ValueError(f"output.overwrite=true would delete {resume}, the checkpoint resume_from="
                         f"{recipe.resume_from} continues; drop one of the two")
    notes: list[str] = []
    if resume is not None:
        ckpt.read_trainer_state(resume)  # refuses the earlier pickle format before anything else
        notes = check_resume_recipe(resume / ckpt.RECIPE_FILE, recipe, f"the checkpoint {resume}")
    cleared = False if own else claim(path, recipe, accelerator)
    message = f"deleted the earlier run in {path}" if cleared else None
    return RunDir(path, resume, fresh=not own, notes=notes), message


@contextmanager
def removed_on_failure(run: RunDir, accelerator) -> Iterator[None]:
    """A fresh run that fails while setting up (data, model, resume checks) leaves no directory."""
    try:
        yield
    except BaseException:
        if run.fresh and accelerator.is_main_process:
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def rerun_command(command: list[str], run_dir: str | Path) -> str:
    """What to type after a run was interrupted: continue from its newest checkpoint, or start again."""
    kept = [a for a in command if not a.startswith(("resume_from=", "output.overwrite="))]
    saved = ckpt.list_checkpoints(run_dir)
    if saved:
        return (f"saved: {saved[-1]} and the metrics up to then; continue with:\n"
                f"  {shlex.join([*kept, 'resume_from=latest'])}")
    path = Path(run_dir)
    if path.is_dir() and any(path.iterdir()):
        again = shlex.join([*(a for a in command if not a.startswith("output.overwrite=")), "output.overwrite=true"])
        return f"no checkpoint was saved in {path}; start again with:\n  {again}"
    return f"nothing was saved; start again with:\n  {shlex.join(command)}"
