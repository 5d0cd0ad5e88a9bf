"""Supervised fine-tuning on chat data: `align sft recipe.yaml [key=value ...]`.

One process or many (`accelerate launch` / `torchrun`): LoRA adapters are trained data-parallel
(DDP over a replicated frozen base), full fine-tuning is sharded with FSDP2 (`fully_shard` per
decoder layer). The loss of a step is the mean over every trained token of the GLOBAL batch
(all micro-batches of all processes): each micro-batch's summed cross-entropy is divided by that
count (`num_items_in_batch`), so 1 process x 2 micro-batches and 2 processes x 1 micro-batch
give the same loss and the same update.

Data order is a pure function of (seed, step): the rows of epoch e are shuffled by a generator
seeded with (seed, e) and step k takes stream positions [k*G, (k+1)*G) of the concatenated
epochs (G = rows per optimizer step). Resuming at step k therefore continues exactly where the
interrupted run was; the checkpoint also restores optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from align.recipe import SFTRecipe, dump_recipe, to_dict
from align.train import checkpointing as ckpt
from align.train import guards, rundir
from align.train.evaluate import eval_loss, exact_match_eval, trained_token_loss
from align.train.lora import apply_lora, lora_config, trainable_summary
from align.train.metrics import MetricsWriter, bar_postfix, check_trackers, progress_bar
from align.train.optim import build_optimizer, build_scheduler
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


def synthetic_files(recipe: SFTRecipe, accelerator: Accelerator) -> tuple[Path, Path]:
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


def load_sft_rows(recipe: SFTRecipe, accelerator: Accelerator) -> tuple[object, object, str, str]:
    """(train rows, eval rows or None, train source, eval source) as datasets.Dataset objects."""
    from data_tools.datasets import load_rows

    data = recipe.data
    if data.synthetic is not None:
        train_path, eval_path = synthetic_files(recipe, accelerator)
        return load_rows(train_path), load_rows(eval_path), str(train_path), str(eval_path)
    train = load_rows(data.train, data.train_split, data.on_error)
    if data.eval is not None:
        return train, load_rows(data.eval, data.eval_split, data.on_error), str(data.train), str(data.eval)
    if data.eval_fraction > 0:
        split = train.train_test_split(test_size=data.eval_fraction, seed=recipe.train.seed)
        return split["train"], split["test"], str(data.train), f"{data.train} (eval_fraction)"
    return train, None, str(data.train), ""


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


class DataOrder:
    """Row indices of optimizer step k: a deterministic function of (seed, k)."""

    def __init__(self, n_rows: int, seed: int, rows_per_step: int):
        self.n, self.seed, self.per_step = n_rows, seed, rows_per_step
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._perms[epoch]

    def step_rows(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + self.per_step)]


def local_micro_batches(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of a step: micro-batch m of rank r is the (m * world + r)-th slice."""
    accum = len(indices) // (world * micro)
    return [indices[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)]


def total_steps(recipe: SFTRecipe, n_rows: int, rows_per_step: int) -> int:
    if recipe.train.steps is not None:
        return recipe.train.steps
    return max(1, math.ceil(recipe.train.epochs * n_rows / rows_per_step))


# ----------------------------------------------------------------------------------------- model


def make_accelerator(recipe: SFTRecipe) -> Accelerator:
    check_trackers(recipe.output.trackers)
    bf16 = recipe.train.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(  # cpu=True without CUDA: torchrun's processes then form a gloo group
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no",
        log_with=recipe.output.trackers or None, project_dir=recipe.output.run_dir,
    )


def load_tokenizer_for(recipe: SFTRecipe):
    from data_tools.tokenizer import CHAT_TEMPLATES, load_tokenizer

    path = recipe.tokenizer.path or recipe.model.path or "tiny"
    template = CHAT_TEMPLATES.get(recipe.tokenizer.chat_template)  # None: the tokenizer's own
    return load_tokenizer(path, chat_template=template)


def load_base_model(recipe: SFTRecipe, device: torch.device, full_checkpoint: Path | None = None):
    """The model to train: a full-FT checkpoint being resumed, a local directory, or a preset."""
    from align.models import DeepseekV2ForCausalLM, build_model

    m = recipe.model
    if full_checkpoint is not None:
        model = DeepseekV2ForCausalLM.from_pretrained(full_checkpoint, dtype=m.dtype, device_map=device)
    elif m.path is not None:
        model = DeepseekV2ForCausalLM.from_pretrained(m.path, dtype=m.dtype, device_map=device)
    else:
        seed = recipe.train.seed if m.seed is None else m.seed
        model = build_model(m.preset, dtype=m.dtype, device_map=device, seed=seed, **m.config)
    if recipe.train.aux_loss_alpha is not None:
        set_aux_loss_alpha(model, recipe.train.aux_loss_alpha)
    return model.train()


def set_aux_loss_alpha(model: torch.nn.Module, alpha: float) -> None:
    """The MoE balance-loss coefficient, in the config (saved with checkpoints) and every MoE layer."""
    model.config.aux_loss_alpha = alpha
    for module in model.modules():
        if hasattr(module, "aux_alpha"):
            module.aux_alpha = float(alpha)


def base_reference(recipe: SFTRecipe, model, tokenizer, accelerator: Accelerator) -> str:
    """Directory of the frozen base a LoRA adapter applies to; a preset base is saved to <run_dir>/base."""
    if recipe.model.path is not None:
        return str(Path(recipe.model.path).resolve())
    base = Path(recipe.output.run_dir) / "base"
    if accelerator.is_main_process and not (base / "config.json").is_file():
        with ckpt.atomic_dir(base, _Solo()) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return str(base.resolve())


class _Solo:
    """The atomic_dir protocol for a write done by one process alone."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def distribution(recipe: SFTRecipe, accelerator: Accelerator) -> str:
    """'single', 'ddp' (LoRA; or full FT when asked) or 'fsdp' (full fine-tuning)."""
    if accelerator.num_processes == 1:
        return "single"
    mode = recipe.train.distributed
    if mode == "fsdp" and recipe.lora is not None:
        raise ValueError("train.distributed=fsdp is for full fine-tuning; LoRA runs use ddp (or auto)")
    return ("ddp" if recipe.lora is not None else "fsdp") if mode == "auto" else mode


def wrap_model(model, mode: str, accelerator: Accelerator):
    """Move to the device and wrap for data parallelism: DDP (accelerate) or FSDP2 (fully_shard)."""
    model = model.to(accelerator.device)
    if mode == "ddp":
        return accelerator.prepare_model(model)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def unwrapped(model, accelerator: Accelerator):
    """The module without DDP (FSDP2 modules are used as they are)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False) if hasattr(model, "module") else model


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mode: str
    base_ref: str | None
    resume: Path | None
    start_step: int = 0
    head: torch.nn.Module | None = None  # the LM head when the loss may use it outside the forward
    trainer_state: dict = field(default_factory=dict)  # of the checkpoint resumed (counters to carry on)


def loss_head(model, mode: str, accelerator: Accelerator):
    """The output Linear for the trained-positions-only loss: one process, or DDP with a frozen head
    (FSDP shards it, and DDP expects trained parameters to be used inside its forward)."""
    head = unwrapped(model, accelerator).get_output_embeddings()
    if mode == "single" or (mode == "ddp" and not head.weight.requires_grad):
        return head
    return None


def check_resume_position(resume: Path, run_steps: int, rows_per_step: int) -> None:
    """The checkpoint's step fits in this run, and it took as many rows per step as this run will."""
    state = ckpt.read_trainer_state(resume)
    if state["step"] > run_steps:
        raise ValueError(
            f"resume_from {resume}: the checkpoint is at step {state['step']}, beyond this recipe's {run_steps} "
            f"steps; set train.steps to at least {state['step']} to continue it"
        )
    if state["step"] and state.get("rows_consumed") != state["step"] * rows_per_step:
        raise ValueError(
            f"resume_from {resume}: it was trained with {state.get('rows_consumed', 0) // state['step']} rows per "
            f"step, this run has {rows_per_step}; keep micro_batch_size x grad_accum x processes equal"
        )


def setup_model(
    recipe: SFTRecipe, tokenizer, accelerator: Accelerator, steps: int, rows_per_step: int, say,
    resume: Path | None, run_steps: int | None = None,
) -> Setup:
    """Model (+LoRA), wrapping, optimizer, scheduler; restored from checkpoint `resume` when given.
    run_steps: the steps of the run as checkpoints count them (default `steps`, the optimizer steps)."""
    if resume is not None:
        check_resume_position(resume, run_steps or steps, rows_per_step)
    full_ckpt = resume / "model" if resume is not None and recipe.lora is None else None
    model = load_base_model(recipe, accelerator.device, full_ckpt)
    base_ref = None
    if recipe.lora is not None:
        base_ref = base_reference(recipe, model, tokenizer, accelerator)
        lo = recipe.lora
        model = apply_lora(model, lora_config(model, lo.r, lo.alpha, lo.dropout, lo.targets, lo.routed_experts))
        if resume is not None:
            ckpt.load_adapter_weights(model, resume / "adapter")
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    say(trainable_summary(model))
    mode = distribution(recipe, accelerator)
    model = wrap_model(model, mode, accelerator)
    o, s = recipe.optim, recipe.schedule
    optimizer = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay)
    scheduler = build_scheduler(optimizer, s.name, steps, s.warmup_steps, s.min_lr_ratio, s.step_at, s.step_factor)
    setup = Setup(model, optimizer, scheduler, mode, base_ref, resume, head=loss_head(model, mode, accelerator))
    if resume is not None:
        state = ckpt.restore_training_state(resume, model, optimizer, scheduler, accelerator)
        setup.start_step, setup.trainer_state = state["step"], state
        say(f"resumed from {resume} at step {setup.start_step}")
    return setup


# -------------------------------------------------------------------------------------- training


@contextmanager
def grad_sync(model, enabled: bool, mode: str):
    """Skip the gradient all-reduce on the non-final micro-batches of a step."""
    if enabled or mode == "single":
        yield
    elif mode == "fsdp":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def train_step(setup: Setup, batches: Sequence[dict], n_items: int, recipe: SFTRecipe, accelerator) -> dict:
    """Forward/backward every micro-batch, clip, step. Returns global loss / aux / grad norm, and
    `_skipped`: the loss or gradient norm was NaN / inf on some process, so no process applied the update."""
    model, world = setup.model, accelerator.num_processes
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [ce share, aux]
    lr = setup.optimizer.param_groups[0]["lr"]
    for m, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with grad_sync(model, m == len(batches) - 1, setup.mode):
            with accelerator.autocast():  # ce: this micro-batch's summed CE / trained tokens of the global batch
                ce, aux = trained_token_loss(model, batch, n_items, setup.head)
            # x world: DDP / FSDP average gradients over processes; the aux loss is a per-micro mean
            accelerator.backward(ce * world + aux / len(batches))
        sums += torch.stack([ce.detach().double(), aux.detach().double() / len(batches)])
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = recipe.train.max_grad_norm or float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    skipped = guards.any_nonfinite(torch.cat([sums, norm.reshape(1).to(sums)]), accelerator)
    if not skipped:
        setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return {"train/loss": sums[0].item(), "train/aux_loss": sums[1].item() / world,
            "train/grad_norm": norm.item(), "train/lr": lr, "_skipped": skipped}


def step_batches(data: SFTData, order: DataOrder, step: int, recipe: SFTRecipe, accelerator):
    """(this process's micro-batches, trained tokens of the global batch, tokens of the global batch)."""
    indices = order.step_rows(step)
    micro = local_micro_batches(indices, accelerator.process_index, accelerator.num_processes,
                                recipe.train.micro_batch_size)
    batches = [data.collate([data.train[i] for i in rows]) for rows in micro]
    return batches, sum(data.trained[i] for i in indices), sum(data.tokens[i] for i in indices)


# ------------------------------------------------------------------------------ saving and eval


def save_checkpoint(setup: Setup, step: int, tokenizer, recipe: SFTRecipe, accelerator, extra: dict) -> Path:
    out = ckpt.checkpoint_dir(recipe.output.run_dir, step)
    sharded = setup.mode == "fsdp"
    guards.require_finite_weights(setup.model, accelerator, step, recipe.output.run_dir)
    with ckpt.atomic_dir(out, accelerator) as tmp:
        model = unwrapped(setup.model, accelerator)
        if recipe.lora is not None:
            if accelerator.is_main_process:
                ckpt.save_adapter(model, tmp / "adapter", setup.base_ref)
                tokenizer.save_pretrained(tmp / "adapter")
        else:
            state = ckpt.full_state_dict(setup.model, sharded)
            if accelerator.is_main_process:
                model.save_pretrained(tmp / "model", state_dict=state)
                tokenizer.save_pretrained(tmp / "model")
        ckpt.save_training_state(tmp, setup.model, setup.optimizer, setup.scheduler,
                                 {"step": step, **extra}, accelerator, dump_recipe(recipe))
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(recipe.output.run_dir, recipe.train.keep_checkpoints)
    return out


def save_final(setup: Setup, tokenizer, recipe: SFTRecipe, accelerator, step: int) -> Path:
    """<run_dir>/final: a full hub-layout checkpoint (LoRA merged in) + tokenizer, of step `step`. Run
    last: merging folds the adapters into the base weights in place."""
    out = Path(recipe.output.run_dir) / "final"
    guards.require_finite_weights(setup.model, accelerator, step, recipe.output.run_dir)
    state = ckpt.full_state_dict(setup.model, setup.mode == "fsdp") if recipe.lora is None else None
    with ckpt.atomic_dir(out, accelerator) as tmp:
        if accelerator.is_main_process:
            model = unwrapped(setup.model, accelerator)
            if recipe.lora is not None:
                model = model.merge_and_unload()
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    return out


def evaluate(setup: Setup, data: SFTData, tokenizer, recipe: SFTRecipe, accelerator, final: bool) -> dict:
    model = unwrapped(setup.model, accelerator) if setup.mode == "ddp" else setup.model
    metrics = {}
    if data.eval:
        metrics["eval/loss"] = eval_loss(model, data.eval, data.collate, recipe.eval.batch_size, accelerator,
                                         setup.head)
    if final and recipe.eval.exact_match and data.eval_rows:
        rows = data.eval_rows[: recipe.eval.samples] if recipe.eval.samples else data.eval_rows
        engine = recipe.eval.engine and setup.mode != "fsdp"  # the engine needs an unsharded model
        score, samples = exact_match_eval(model, tokenizer, rows, recipe.eval.max_new_tokens,
                                          recipe.eval.batch_size, accelerator, engine)
        metrics["eval/exact_match"] = score
        metrics["_samples"] = samples
    return metrics


# ------------------------------------------------------------------------------------ main loop


@contextmanager
def deterministic_algorithms(enabled: bool):
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


def prepare_run(recipe: SFTRecipe, accelerator: Accelerator) -> tuple[rundir.RunDir, object]:
    """Seeding, the run directory checked (rundir), the printed resolved recipe (saved by write_recipe)."""
    set_seed(recipe.train.seed)
    run, cleared = rundir.open_run_dir(recipe, accelerator)

    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    say(f"resolved recipe (saved to {run.path / rundir.RECIPE} once the run is set up):\n{dump_recipe(recipe)}")
    if cleared:
        say(cleared)
    if run.notes:
        say(f"resuming {run.resume} with changed settings: {'; '.join(run.notes)}")
    return run, say


def write_recipe(run: rundir.RunDir, recipe: SFTRecipe, accelerator: Accelerator) -> None:
    """<run_dir>/recipe.yaml, once every check of the run has passed."""
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / rundir.RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
    accelerator.wait_for_everyone()


def run_sft(recipe: SFTRecipe) -> dict:
    """Train per the recipe; returns the final metrics (eval/loss, eval/exact_match when enabled)."""
    with deterministic_algorithms(recipe.train.deterministic):
        return _run_sft(recipe)


def _run_sft(recipe: SFTRecipe) -> dict:
    accelerator = make_accelerator(recipe)
    run, say = prepare_run(recipe, accelerator)
    run_dir, t = run.path, recipe.train
    with rundir.removed_on_failure(run, accelerator):
        tokenizer = load_tokenizer_for(recipe)
        data = prepare_data(recipe, tokenizer, accelerator, say)
        rows_per_step = t.micro_batch_size * t.grad_accum * accelerator.num_processes
        steps = total_steps(recipe, len(data.train), rows_per_step)
        setup = setup_model(recipe, tokenizer, accelerator, steps, rows_per_step, say, run.resume)
        write_recipe(run, recipe, accelerator)
    say(f"{accelerator.num_processes} process(es), {setup.mode}, device {accelerator.device}, "
        f"{steps} steps of {rows_per_step} rows ({steps * rows_per_step / len(data.train):.2f} epochs)")
    if setup.resume is None:  # per-process streams (dropout); a resumed run restored its own
        set_seed(t.seed + accelerator.process_index)
    writer = MetricsWriter(run_dir, accelerator.is_main_process, setup.start_step if setup.resume else None)
    if recipe.output.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(to_dict(recipe)))
    final = train_loop(setup, data, tokenizer, recipe, accelerator, steps, rows_per_step, writer)
    if recipe.output.trackers:
        accelerator.end_training()
    return final


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, name) if isinstance(value, dict) else {name: str(value)})
    return out


def _say(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


def _log(step: int, metrics: dict, writer: MetricsWriter, accelerator, bar) -> None:
    shown = {k: v for k, v in metrics.items() if not k.startswith("_")}
    writer.write(step, shown)
    if accelerator.trackers:
        accelerator.log(shown, step=step)
    if bar is not None and "train/loss" in shown:
        bar.set_postfix(bar_postfix(shown), refresh=False)


def train_loop(setup, data, tokenizer, recipe, accelerator, steps, rows_per_step, writer) -> dict:
    t = recipe.train
    order = DataOrder(len(data.train), t.seed, rows_per_step)
    bar = progress_bar(steps, setup.start_step, recipe.output.progress and accelerator.is_main_process)
    guard = guards.NonFiniteGuard(t.max_nonfinite_steps, recipe.output.run_dir,
                                  int(setup.trainer_state.get("nonfinite_steps", 0)))
    window: list[dict] = []  # the applied steps since the last log record
    clock, tokens = time.perf_counter(), 0
    for step in range(setup.start_step, steps):
        batches, n_items, n_tokens = step_batches(data, order, step, recipe, accelerator)
        result, done = train_step(setup, batches, max(n_items, 1), recipe, accelerator), step + 1
        if result.pop("_skipped"):
            _say(accelerator, guard.skipped(done, result))  # raises past train.max_nonfinite_steps
        else:
            window.append(result)
        tokens += n_tokens
        bar.update(1)
        if (done % t.log_every == 0 or done == steps) and window:
            elapsed = time.perf_counter() - clock
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            metrics.update({"train/lr": window[-1]["train/lr"], "train/tokens_per_s": tokens / elapsed,
                            "train/epoch": done * rows_per_step / len(data.train)})
            metrics.update({"train/nonfinite_steps": guard.count} if guard.count else {})
            _log(done, metrics, writer, accelerator, bar)
            window, clock, tokens = [], time.perf_counter(), 0
        if t.eval_every and done % t.eval_every == 0 and done != steps:
            _log(done, evaluate(setup, data, tokenizer, recipe, accelerator, final=False), writer, accelerator, None)
        if (t.save_every and done % t.save_every == 0) or done == steps:
            save_checkpoint(setup, done, tokenizer, recipe, accelerator,
                            {"rows_consumed": done * rows_per_step, "total_steps": steps,
                             "world_size": accelerator.num_processes, "nonfinite_steps": guard.count})
    bar.close()
    return finish(setup, data, tokenizer, recipe, accelerator, steps, writer)


def finish(setup, data, tokenizer, recipe, accelerator, steps, writer) -> dict:
    """Final eval (loss, exact match), the merged final checkpoint, the closing summary."""
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    metrics = evaluate(setup, data, tokenizer, recipe, accelerator, final=True)
    samples = metrics.pop("_samples", [])
    if metrics:
        _log(steps, metrics, writer, accelerator, None)
    for s in samples:
        say(f"  sample: {s['prompt']!r} -> {s['completion']!r} (answer {s['answer']}, "
            f"{'ok' if s['correct'] else 'wrong'})")
    if "eval/loss" in metrics:
        say(f"eval loss: {metrics['eval/loss']:.4f}")
    if "eval/exact_match" in metrics:
        say(f"eval exact match: {metrics['eval/exact_match']:.1%}")
    last = ckpt.checkpoint_dir(recipe.output.run_dir, steps)
    say(f"checkpoint: {last}")
    if recipe.output.merge:
        say(f"final model (merged, with tokenizer): {save_final(setup, tokenizer, recipe, accelerator, steps)}")
    return metrics
