"""The run floor every training loop (sft, grpo) stands on: the accelerator, the run directory and its
recipe, the tokenizer and synthetic data files, checkpoints and the final model, metric records and
trackers, and the log / eval / save cadence. The model being trained is `align.train.setup`'s.

A loop opens a run with `make_accelerator` + `prepare_run`, sets up inside
`rundir.removed_on_failure`, then writes the recipe (`write_recipe`) and trains under `feedback`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from align.recipe import LoopSection, RecipeBase, dump_recipe, to_dict
from align.train import checkpointing as ckpt
from align.train import guards, rundir
from align.train.metrics import MetricsWriter, bar_postfix, check_trackers
from align.train.setup import Setup

Say = Callable[[str], None]


def make_accelerator(recipe: RecipeBase) -> Accelerator:
    check_trackers(recipe.output.trackers)
    bf16 = recipe.train.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(  # cpu=True without CUDA: torchrun's processes then form a gloo group
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no",
        log_with=recipe.output.trackers or None, project_dir=recipe.output.run_dir,
    )


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run only (it is process-wide state)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def speaker(accelerator: Accelerator) -> Say:
    """print on the main process only."""

    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return say


def prepare_run(recipe: RecipeBase, accelerator: Accelerator) -> tuple[rundir.RunDir, Say]:
    """Seeding, the run directory checked (rundir), the printed resolved recipe (saved by write_recipe)."""
    set_seed(recipe.train.seed)
    run, cleared = rundir.open_run_dir(recipe, accelerator)
    say = speaker(accelerator)
    say(f"resolved recipe (saved to {run.path / rundir.RECIPE} once the run is set up):\n{dump_recipe(recipe)}")
    if cleared:
        say(cleared)
    if run.notes:
        say(f"resuming {run.resume} with changed settings: {'; '.join(run.notes)}")
    return run, say


def write_recipe(run: rundir.RunDir, recipe: RecipeBase, accelerator: Accelerator) -> None:
    """<run_dir>/recipe.yaml, once every check of the run has passed."""
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / rundir.RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
    accelerator.wait_for_everyone()


def load_tokenizer_for(recipe: RecipeBase):
    from data_tools.tokenizer import CHAT_TEMPLATES, load_tokenizer

    path = recipe.tokenizer.path or recipe.model.path or "tiny"
    template = CHAT_TEMPLATES.get(recipe.tokenizer.chat_template)  # None: the tokenizer's own
    return load_tokenizer(path, chat_template=template)


def synthetic_files(recipe: RecipeBase, accelerator: Accelerator) -> tuple[Path, Path]:
    """Write the recipe's synthetic train / test splits under <run_dir>/data (SFT and RL recipes alike)."""
    from data_tools.jsonl import write_jsonl
    from data_tools.synthetic import arithmetic_splits

    spec, out = recipe.data.synthetic, Path(recipe.output.run_dir) / "data"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            train, test = arithmetic_splits(spec.train, spec.test, spec.seed, max_operand=spec.max_operand,
                                            ops=spec.ops, teacher_error=spec.teacher_error,
                                            replies_per_problem=spec.replies_per_problem)
            write_jsonl(train, out / "train.jsonl")
            write_jsonl(test, out / "test.jsonl")
    return out / "train.jsonl", out / "test.jsonl"


def file_rows(data, seed: int) -> tuple[object, object, str, str]:
    """(train rows, eval rows or None, train source, eval source) of `data.train`, then `data.eval` or a
    seeded `data.eval_fraction` split of train (datasets.Dataset objects)."""
    from data_tools.datasets import load_rows

    train = load_rows(data.train, data.train_split, data.on_error)
    if data.eval is not None:
        return train, load_rows(data.eval, data.eval_split, data.on_error), str(data.train), str(data.eval)
    if data.eval_fraction > 0:
        split = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        return split["train"], split["test"], str(data.train), f"{data.train} (eval_fraction)"
    return train, None, str(data.train), ""


def apply_step(setup: Setup, sums: torch.Tensor, max_grad_norm: float | None) -> tuple:
    """After the micro-batches' backward passes: clip, sum the step's statistics `sums` over processes, and
    step the optimizer unless a statistic or the gradient norm is NaN / inf on some process (then no process
    does). Returns (global sums, gradient norm, skipped)."""
    accelerator = setup.accelerator
    params = [p for p in setup.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    skipped = guards.any_nonfinite(torch.cat([sums, norm.reshape(1).to(sums)]), accelerator)
    if not skipped:
        setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return sums, norm, skipped


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(setup: Setup, step: int, tokenizer, recipe: RecipeBase, extra: dict) -> Path:
    """<run_dir>/checkpoints/step-N: the weights (`setup.save`), optimizer, scheduler, RNG and trainer state."""
    out, accelerator = ckpt.checkpoint_dir(recipe.output.run_dir, step), setup.accelerator
    guards.require_finite_weights(setup.model, accelerator, step, recipe.output.run_dir)
    with ckpt.atomic_dir(out, accelerator) as tmp:
        setup.save(tmp, tokenizer)
        ckpt.save_training_state(tmp, setup.model, setup.optimizer, setup.scheduler,
                                 {"step": step, **extra}, accelerator, dump_recipe(recipe))
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(recipe.output.run_dir, recipe.train.keep_checkpoints)
    return out


def save_final(setup: Setup, tokenizer, recipe: RecipeBase, step: int) -> Path:
    """<run_dir>/final: a full hub-layout checkpoint (LoRA merged in) + tokenizer, of step `step`. Run
    last: merging folds the adapters into the base weights in place."""
    out, accelerator = Path(recipe.output.run_dir) / "final", setup.accelerator
    guards.require_finite_weights(setup.model, accelerator, step, recipe.output.run_dir)
    state = setup.final_state()
    with ckpt.atomic_dir(out, accelerator) as tmp:
        if accelerator.is_main_process:
            setup.final_model().save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    return out


# -------------------------------------------------------------------------------------- feedback


@dataclass(frozen=True)
class Cadence:
    """When a loop logs, evaluates and saves, by the number of steps done (the last step always logs and saves)."""

    train: LoopSection
    steps: int

    def log(self, done: int) -> bool:
        return done % self.train.log_every == 0 or done == self.steps

    def eval(self, done: int) -> bool:
        return bool(self.train.eval_every) and done % self.train.eval_every == 0 and done != self.steps

    def save(self, done: int) -> bool:
        return bool(self.train.save_every and done % self.train.save_every == 0) or done == self.steps


def peak_memory(device: torch.device) -> dict:
    """{"train/peak_gib": the most GPU memory this process has held in tensors so far}; {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {"train/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


@dataclass
class Log:
    """A metric record to metrics.jsonl (main process), accelerate's trackers and the progress bar."""

    writer: MetricsWriter
    accelerator: Accelerator

    def __call__(self, step: int, metrics: dict, bar=None) -> None:
        if not metrics:
            return
        self.writer.write(step, metrics)
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)
        if bar is not None:
            bar.set_postfix(bar_postfix(metrics), refresh=False)


@contextmanager
def feedback(recipe: RecipeBase, setup: Setup, run_dir: Path) -> Iterator[Log]:
    """metrics.jsonl (a resumed run drops the records past its step) and the trackers, for the training."""
    accelerator = setup.accelerator
    writer = MetricsWriter(run_dir, accelerator.is_main_process, setup.start_step if setup.resume else None)
    if recipe.output.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(to_dict(recipe)))
    yield Log(writer, accelerator)
    if recipe.output.trackers:
        accelerator.end_training()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, name) if isinstance(value, dict) else {name: str(value)})
    return out
