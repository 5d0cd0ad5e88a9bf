"""Supervised fine-tuning on chat data: `align sft recipe.yaml [key=value ...]`.

One process or many (`accelerate launch` / `torchrun`): LoRA adapters are trained data-parallel
(DDP over a replicated frozen base), full fine-tuning is sharded with FSDP2 (`fully_shard` per
decoder layer). The loss of a step is the mean over every trained token of the GLOBAL batch
(all micro-batches of all processes): each micro-batch's summed cross-entropy is divided by that
count (`num_items_in_batch`), so 1 process x 2 micro-batches and 2 processes x 1 micro-batch
give the same loss and the same update.

Data order is a pure function of (seed, step) (align.train.order), so resuming at step k continues
exactly where the interrupted run was; the checkpoint also restores optimizer, scheduler and RNG
states. Accelerator, run directory, model setup and checkpoints are the run floor's (align.train.run,
align.train.setup).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from align.recipe import SFTRecipe
from align.train import checkpointing as ckpt
from align.train import guards, micro_batch, run, rundir
from align.train.evaluate import eval_loss, exact_match_eval, trained_token_loss
from align.train.metrics import progress_bar
from align.train.order import DataOrder, local_micro_batches
from align.train.setup import Setup, setup_model
from data_tools.chat import IGNORE_INDEX
from data_tools.tokenizer import padding_id

# ------------------------------------------------------------------------------------------ data


@dataclass
class SFTData:
    train: list[dict]  # packed rows or single examples, {"input_ids", "labels"[, "position_ids"]}
    eval: list[dict]
    eval_rows: list[dict]  # raw eval rows (for exact match)
    packed: bool
    pad_id: int
    trained: list[int] = field(default_factory=list)  # per train row: tokens the loss counts
    tokens: list[int] = field(default_factory=list)  # per train row: non-padding tokens

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from data_tools.packing import collate_packed, pad_batch

        return collate_packed(rows, self.pad_id) if self.packed else pad_batch(rows, self.pad_id)


def load_sft_rows(recipe: SFTRecipe, accelerator: Accelerator) -> tuple[object, object, str, str]:
    """(train rows, eval rows or None, train source, eval source) as datasets.Dataset objects."""
    from data_tools.datasets import load_rows

    data = recipe.data
    if data.synthetic is not None:
        train_path, eval_path = run.synthetic_files(recipe, accelerator)
        return load_rows(train_path), load_rows(eval_path), str(train_path), str(eval_path)
    return run.file_rows(data, recipe.train.seed)


def _tokenize(rows, tokenizer, recipe: SFTRecipe, source: str, say) -> list[dict]:
    from data_tools.datasets import tokenize_dataset

    d = recipe.data
    examples, stats = tokenize_dataset(rows, tokenizer, max_length=d.max_length, train_on=d.train_on,
                                       truncation=d.truncation, on_error=d.on_error, source=source)
    say(stats.summary())
    if not examples:
        raise ValueError(f"{source}: no usable example left after tokenization (see the counts above)")
    return examples


def prepare_data(recipe: SFTRecipe, tokenizer, accelerator: Accelerator, say) -> SFTData:
    """Load, tokenize (printing length statistics) and optionally pack the train and eval data."""
    from data_tools.packing import pack_best_fit, packing_efficiency, pad_tail_start

    train_rows, eval_rows, train_src, eval_src = load_sft_rows(recipe, accelerator)
    pad_id = padding_id(tokenizer)
    train = _tokenize(train_rows, tokenizer, recipe, train_src, say)
    evals = _tokenize(eval_rows, tokenizer, recipe, eval_src, say) if eval_rows is not None else []
    packed = recipe.data.packing
    if packed:
        train = pack_best_fit(train, recipe.data.max_length, pad_id)
        evals = pack_best_fit(evals, recipe.data.max_length, pad_id) if evals else []
        say(f"packed into {len(train)} rows of {recipe.data.max_length} tokens "
            f"({packing_efficiency(train, pad_id):.1%} filled)")
    data = SFTData(train, evals, list(eval_rows) if eval_rows is not None else [], packed, pad_id)
    data.trained = [sum(x != IGNORE_INDEX for x in row["labels"][1:]) for row in train]
    data.tokens = [pad_tail_start(row, pad_id) if packed else len(row["input_ids"]) for row in train]
    return data


def total_steps(recipe: SFTRecipe, n_rows: int, rows_per_step: int) -> int:
    if recipe.train.steps is not None:
        return recipe.train.steps
    return max(1, math.ceil(recipe.train.epochs * n_rows / rows_per_step))


# -------------------------------------------------------------------------------------- training


def train_step(setup: Setup, batches: Sequence[dict], n_items: int, recipe: SFTRecipe, accelerator) -> dict:
    """Forward/backward every micro-batch, clip, step. Returns global loss / aux / grad norm, and
    `_skipped`: the loss or gradient norm was NaN / inf on some process, so no process applied the update."""
    model, world = setup.model, accelerator.num_processes
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [ce share, aux]
    lr = setup.optimizer.param_groups[0]["lr"]
    for m, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with setup.grad_sync(m == len(batches) - 1):
            with accelerator.autocast():  # ce: this micro-batch's summed CE / trained tokens of the global batch
                ce, aux = trained_token_loss(model, batch, n_items, setup.head)
            # x world: DDP / FSDP average gradients over processes; the aux loss is a per-micro mean
            accelerator.backward(ce * world + aux / len(batches))
        sums += torch.stack([ce.detach().double(), aux.detach().double() / len(batches)])
    sums, norm, skipped = run.apply_step(setup, sums, recipe.train.max_grad_norm)
    return {"train/loss": sums[0].item(), "train/aux_loss": sums[1].item() / world,
            "train/grad_norm": norm.item(), "train/lr": lr, "_skipped": skipped}


def step_batches(data: SFTData, order: DataOrder, step: int, micro_batch_size: int, accelerator):
    """(this process's micro-batches, trained tokens of the global batch, tokens of the global batch)."""
    indices = order.step_rows(step)
    micro = local_micro_batches(indices, accelerator.process_index, accelerator.num_processes, micro_batch_size)
    batches = [data.collate([data.train[i] for i in rows]) for rows in micro]
    return batches, sum(data.trained[i] for i in indices), sum(data.tokens[i] for i in indices)


# ------------------------------------------------------------------------------------------ eval


def evaluate(setup: Setup, data: SFTData, tokenizer, recipe: SFTRecipe, final: bool) -> tuple[dict, list[dict]]:
    """(metrics, exact-match samples): eval/loss, and at the end eval/exact_match when enabled."""
    accelerator = setup.accelerator
    metrics, samples = {}, []
    if data.eval:
        metrics["eval/loss"] = eval_loss(setup.unwrapped, data.eval, data.collate, recipe.eval.batch_size,
                                         accelerator, setup.head)
    if final and recipe.eval.exact_match and data.eval_rows:
        rows = data.eval_rows[: recipe.eval.samples] if recipe.eval.samples else data.eval_rows
        engine = recipe.eval.engine and not setup.sharded  # the engine needs an unsharded model
        metrics["eval/exact_match"], samples = exact_match_eval(
            setup.unwrapped, tokenizer, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size, accelerator, engine)
    return metrics, samples


# ------------------------------------------------------------------------------------ main loop


def run_sft(recipe: SFTRecipe) -> dict:
    """Train per the recipe; returns the final metrics (eval/loss, eval/exact_match when enabled)."""
    with run.deterministic_algorithms(recipe.train.deterministic):
        return _run_sft(recipe)


def _run_sft(recipe: SFTRecipe) -> dict:
    accelerator = run.make_accelerator(recipe)
    opened, say = run.prepare_run(recipe, accelerator)
    t = recipe.train
    with rundir.removed_on_failure(opened, accelerator):
        tokenizer = run.load_tokenizer_for(recipe)
        data = prepare_data(recipe, tokenizer, accelerator, say)
        rows_per_step = micro_batch.rows_per_step(t, accelerator.num_processes)
        steps = total_steps(recipe, len(data.train), rows_per_step)
        setup = setup_model(recipe, tokenizer, accelerator, steps, rows_per_step, say, opened.resume, task=data)
        micro = micro_batch.choose_micro_batch(setup, data, t, trained_token_loss, say)
        run.write_recipe(opened, recipe, accelerator)
    say(f"{accelerator.num_processes} process(es), {setup.distribution}, device {accelerator.device}, "
        f"{steps} steps of {rows_per_step} rows ({steps * rows_per_step / len(data.train):.2f} epochs)")
    if setup.resume is None:  # per-process streams (dropout); a resumed run restored its own
        set_seed(t.seed + accelerator.process_index)
    with run.feedback(recipe, setup, opened.path) as log:
        return train_loop(Loop(setup, data, tokenizer, recipe, steps, rows_per_step, micro, log, say))


@dataclass
class Loop:
    setup: Setup
    data: SFTData
    tokenizer: object
    recipe: SFTRecipe
    steps: int
    rows_per_step: int
    micro_batch_size: int  # rows per forward (train.micro_batch_size, or what auto chose)
    log: run.Log
    say: run.Say


def train_loop(loop: Loop) -> dict:
    setup, data, recipe, steps, t = loop.setup, loop.data, loop.recipe, loop.steps, loop.recipe.train
    accelerator, cadence = setup.accelerator, run.Cadence(t, steps)
    order = DataOrder(len(data.train), t.seed, loop.rows_per_step)
    bar = progress_bar(steps, setup.start_step, recipe.output.progress and accelerator.is_main_process)
    guard = guards.NonFiniteGuard(t.max_nonfinite_steps, recipe.output.run_dir,
                                  int(setup.trainer_state.get("nonfinite_steps", 0)))
    window: list[dict] = []  # the applied steps since the last log record
    clock, tokens = time.perf_counter(), 0
    for step in range(setup.start_step, steps):
        batches, n_items, n_tokens = step_batches(data, order, step, loop.micro_batch_size, accelerator)
        result, done = train_step(setup, batches, max(n_items, 1), recipe, accelerator), step + 1
        if result.pop("_skipped"):
            loop.say(guard.skipped(done, result))  # raises past train.max_nonfinite_steps
        else:
            window.append(result)
        tokens += n_tokens
        bar.update(1)
        if cadence.log(done) and window:
            elapsed = time.perf_counter() - clock
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            metrics.update({"train/lr": window[-1]["train/lr"], "train/tokens_per_s": tokens / elapsed,
                            "train/epoch": done * loop.rows_per_step / len(data.train)})
            metrics.update({"train/nonfinite_steps": guard.count} if guard.count else {})
            metrics.update(run.peak_memory(accelerator.device))
            loop.log(done, metrics, bar)
            window, clock, tokens = [], time.perf_counter(), 0
        if cadence.eval(done):
            loop.log(done, evaluate(setup, data, loop.tokenizer, recipe, final=False)[0])
        if cadence.save(done):
            run.save_checkpoint(setup, done, loop.tokenizer, recipe,
                                {"rows_consumed": done * loop.rows_per_step, "total_steps": steps,
                                 "world_size": accelerator.num_processes, "nonfinite_steps": guard.count})
    bar.close()
    return finish(loop)


def finish(loop: Loop) -> dict:
    """Final eval (loss, exact match), the merged final checkpoint, the closing summary."""
    setup, recipe, say = loop.setup, loop.recipe, loop.say
    metrics, samples = evaluate(setup, loop.data, loop.tokenizer, recipe, final=True)
    loop.log(loop.steps, metrics)
    for s in samples:
        say(f"  sample: {s['prompt']!r} -> {s['completion']!r} (answer {s['answer']}, "
            f"{'ok' if s['correct'] else 'wrong'})")
    if "eval/loss" in metrics:
        say(f"eval loss: {metrics['eval/loss']:.4f}")
    if "eval/exact_match" in metrics:
        say(f"eval exact match: {metrics['eval/exact_match']:.1%}")
    say(f"checkpoint: {ckpt.checkpoint_dir(recipe.output.run_dir, loop.steps)}")
    if recipe.output.merge:
        say(f"final model (merged, with tokenizer): {run.save_final(setup, loop.tokenizer, recipe, loop.steps)}")
    return metrics
