"""Reward-model training: `align rm recipe.yaml [key=value ...]` (Bradley-Terry, as trl.RewardTrainer).

The model is align.models.DeepseekV2ForSequenceClassification: the SFT model's backbone with a scalar score
head read at each sequence's last non-pad token. A step takes `micro_batch_size` pairs per forward (the
chosen and rejected sides of a micro-batch go through one forward, right padded), for `grad_accum`
micro-batches on each process; the loss is the mean over every pair of the GLOBAL batch (align.train.rm_loss),
plus the MoE balance loss. LoRA (the score head trains in full beside the adapters), full fine-tuning,
DDP / FSDP2, resume, the log / eval / save cadence and <run_dir>/final are the run floor's (run.py,
setup.py), as for `align sft`. Metrics: train/ and eval/ loss, accuracy (r_chosen > r_rejected), margin,
reward mean / std of chosen and rejected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from align.recipe import RMRecipe
from align.train import guards, run, rundir
from align.train.evaluate import shard
from align.train.metrics import progress_bar
from align.train.order import DataOrder, local_micro_batches
from align.train.rm_loss import SUMS, pair_losses, pair_metrics, pair_sums
from align.train.setup import Setup, setup_model

# ------------------------------------------------------------------------------------------ data


@dataclass
class PairData:
    train: list[dict]  # {"chosen_ids", "rejected_ids", "margin", "row"}
    eval: list[dict]
    eval_rows: list[dict]  # the raw eval rows (a `wrong` column gives a per-kind accuracy)
    pad_id: int
    margins: bool  # the data has a margin column

    def collate(self, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
        """ids [2n, S]: the n chosen sides then the n rejected, right padded; token_mask; margin [n]."""
        sides = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        ids = torch.full((len(sides), max(map(len, sides))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, side in enumerate(sides):
            ids[b, : len(side)] = torch.as_tensor(side, dtype=torch.long)
            mask[b, : len(side)] = 1
        return {"input_ids": ids, "token_mask": mask,
                "margin": torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)}


def likeliest_mistakes(recipe: RMRecipe, tokenizer, batch_size: int = 512):
    """For `other_wrong: likeliest`: problems -> (the wrong reply the causal LM at model.path finds likeliest among
    the one-digit changes of the right answer, the probability of its wrong digit): one forward over each prompt +
    right reply; at each answer digit, the wrong digit the model gives the most probability after the right
    prefix, and of those the most probable (a leading zero is not a candidate). These are the near misses
    sampling from that model makes; one forward per problem, where sampling them took minutes (README)."""
    from align.models import DeepseekV2ForCausalLM
    from align.models.sequence_classification import is_score_checkpoint
    from data_tools.synthetic import solve

    path = recipe.model.path
    if path is None or is_score_checkpoint(path):
        raise ValueError("data.synthetic.other_wrong 'likeliest' rejects the mistakes of the model the reward model "
                         "starts from: model.path must be a causal-LM checkpoint (an SFT final/)")
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    if len(set(digits)) != 10 or tokenizer.unk_token_id in digits:
        raise ValueError(f"other_wrong 'likeliest' needs one token per digit; the tokenizer of {path} has none")
    digit_of = {t: d for d, t in enumerate(digits)}

    def encode(problem) -> tuple[list[int], str]:
        a, op, b = problem
        right = str(solve(a, op, b))
        chat = [{"role": "user", "content": f"What is {a} {op} {b}?"}, {"role": "assistant", "content": right}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        end = len(ids) - 1 if ids[-1] == tokenizer.eos_token_id else len(ids)
        if [digit_of.get(t) for t in ids[end - len(right) : end]] != [int(c) for c in right]:
            raise ValueError(f"other_wrong 'likeliest': the reply {right!r} does not end the rendered chat in digit "
                             "tokens")
        return ids, right

    def mistakes(problems: list[tuple[int, str, int]]) -> list[tuple[str, float]]:
        out = []
        for start in range(0, len(problems), batch_size):
            encoded = [encode(p) for p in problems[start : start + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), tokenizer.eos_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (seq, _) in enumerate(encoded):
                ids[row, : len(seq)], mask[row, : len(seq)] = torch.as_tensor(seq), 1
            with torch.inference_mode():
                logp = model(input_ids=ids, attention_mask=mask).logits[..., digits].float().log_softmax(-1)
            for row, (seq, right) in enumerate(encoded):
                end = len(seq) - 1 if seq[-1] == tokenizer.eos_token_id else len(seq)
                best = (-math.inf, right)
                for k, char in enumerate(right):
                    scores = logp[row, end - len(right) + k - 1].clone()  # predicts digit k from the right prefix
                    scores[int(char)] = -math.inf
                    if k == 0 and len(right) > 1:
                        scores[0] = -math.inf
                    d = int(scores.argmax())
                    if scores[d] > best[0]:
                        best = (scores[d].item(), right[:k] + str(d) + right[k + 1 :])
                out.append((best[1], math.exp(best[0])))
        return out

    return mistakes


def synthetic_pair_files(recipe: RMRecipe, tokenizer, accelerator: Accelerator):
    """<run_dir>/data/{train,test}.jsonl of the synthetic preference pairs (main process writes)."""
    from pathlib import Path

    from data_tools.jsonl import write_jsonl
    from data_tools.synthetic_preferences import preference_splits

    spec, out = recipe.data.synthetic, Path(recipe.output.run_dir) / "data"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            mistakes = likeliest_mistakes(recipe, tokenizer) if spec.other_wrong in ("likeliest", "mixed") else None
            train, test = preference_splits(spec.train, spec.test, spec.seed, max_operand=spec.max_operand,
                                            ops=spec.ops, borrow_share=spec.borrow_share,
                                            other_wrong=spec.other_wrong, mistakes=mistakes)
            write_jsonl(train, out / "train.jsonl")
            write_jsonl(test, out / "test.jsonl")
    return out / "train.jsonl", out / "test.jsonl"


def prepare_pairs(recipe: RMRecipe, tokenizer, accelerator: Accelerator, say) -> PairData:
    from data_tools.datasets import load_rows
    from data_tools.preferences import tokenize_pairs
    from data_tools.tokenizer import padding_id

    d = recipe.data
    if d.synthetic is not None:
        train_path, eval_path = synthetic_pair_files(recipe, tokenizer, accelerator)
        rows = load_rows(train_path), load_rows(eval_path), str(train_path), str(eval_path)
    else:
        rows = run.file_rows(d, recipe.train.seed)
    sets = []
    for part, source in ((rows[0], rows[2]), (rows[1], rows[3])):
        pairs, stats = tokenize_pairs(part, tokenizer, max_length=d.max_length, on_error=d.on_error,
                                      source=source) if part is not None else ([], None)
        if stats is not None:
            say(stats.summary())
        sets.append(pairs)
    if not sets[0]:
        raise ValueError(f"{rows[2]}: no preference pair left after tokenization (see the counts above)")
    margins = "margin" in (rows[0].column_names if hasattr(rows[0], "column_names") else [])
    return PairData(sets[0], sets[1], list(rows[1]) if rows[1] is not None else [], padding_id(tokenizer), margins)


# -------------------------------------------------------------------------------------- training


def score_pairs(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen scores [n], rejected scores [n], balance loss) of a collated batch of n pairs."""
    out = model(input_ids=batch["input_ids"].to(device), token_mask=batch["token_mask"].to(device))
    scores = out.logits[:, 0]
    n = scores.shape[0] // 2
    aux = out.aux_loss if out.aux_loss is not None else scores.new_zeros(())
    return scores[:n], scores[n:], aux


def train_step(setup: Setup, batches: Sequence[dict], n_pairs: int, recipe: RMRecipe, data: PairData) -> dict:
    """Forward / backward every micro-batch, clip, step; pair metrics of the global batch, `_skipped` as sft's."""
    model, accelerator = setup.model, setup.accelerator
    world, device, center = accelerator.num_processes, accelerator.device, recipe.rm.center_rewards_coefficient
    sums = torch.zeros(len(SUMS) + 1, dtype=torch.float64, device=device)  # SUMS + [aux]
    lr = setup.optimizer.param_groups[0]["lr"]
    for m, batch in enumerate(batches):
        with setup.grad_sync(m == len(batches) - 1):
            with accelerator.autocast():
                chosen, rejected, aux = score_pairs(model, batch, device)
                margin = batch["margin"].to(device) if data.margins else None
                losses = pair_losses(chosen, rejected, margin, center)
            accelerator.backward(losses.sum() / n_pairs * world + aux / len(batches))
        sums += torch.cat([pair_sums(losses, chosen, rejected), aux.detach().double().reshape(1) / len(batches)])
    sums, norm, skipped = run.apply_step(setup, sums, recipe.train.max_grad_norm)
    return {**pair_metrics(sums[:-1], n_pairs, "train"), "train/aux_loss": sums[-1].item() / world,
            "train/grad_norm": norm.item(), "train/lr": lr, "_skipped": skipped}


@torch.no_grad()
def evaluate(setup: Setup, data: PairData, recipe: RMRecipe) -> tuple[dict, list[float]]:
    """(eval/ pair metrics over every eval pair of all processes, r_c - r_r of every eval pair in order)."""
    if not data.eval:
        return {}, []
    accelerator, model = setup.accelerator, setup.unwrapped
    mine, real = shard(data.eval, accelerator.process_index, accelerator.num_processes)
    sums = torch.zeros(len(SUMS), dtype=torch.float64, device=accelerator.device)
    gaps: list[float] = []
    was_training, size = model.training, recipe.eval.batch_size
    model.eval()
    for start in range(0, len(mine), size):
        keep = max(0, min(size, real - start))  # shard's padding copies are scored, not counted
        with accelerator.autocast():
            chosen, rejected, _ = score_pairs(model, data.collate(mine[start : start + size]), accelerator.device)
        chosen, rejected = chosen[:keep], rejected[:keep]
        sums += pair_sums(pair_losses(chosen, rejected, None, None), chosen, rejected)
        gaps += (chosen - rejected).float().tolist()
    model.train(was_training)
    world = accelerator.num_processes
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        mine_gaps = torch.tensor(gaps + [0.0] * (len(mine) - real), device=accelerator.device)
        every = accelerator.gather(mine_gaps).reshape(world, len(mine)).T.reshape(-1)  # rank r's j-th: j * world + r
        gaps = every[: len(data.eval)].tolist()
    return pair_metrics(sums, len(data.eval), "eval"), gaps


# ------------------------------------------------------------------------------------ main loop


def run_rm(recipe: RMRecipe) -> dict:
    """Train the reward model per the recipe; returns the final eval metrics."""
    with run.deterministic_algorithms(recipe.train.deterministic):
        return _run_rm(recipe)


def _run_rm(recipe: RMRecipe) -> dict:
    accelerator = run.make_accelerator(recipe)
    opened, say = run.prepare_run(recipe, accelerator)
    t = recipe.train
    with rundir.removed_on_failure(opened, accelerator):
        tokenizer = run.load_tokenizer_for(recipe)
        data = prepare_pairs(recipe, tokenizer, accelerator, say)
        per_step = t.micro_batch_size * t.grad_accum * accelerator.num_processes
        steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * len(data.train) / per_step))
        setup = setup_model(recipe, tokenizer, accelerator, steps, per_step, say, opened.resume)
        setup.unwrapped.config.pad_token_id = data.pad_id  # the score is read at the last token that is not this
        run.write_recipe(opened, recipe, accelerator)
    say(f"{accelerator.num_processes} process(es), {setup.distribution}, device {accelerator.device}, "
        f"{steps} steps of {per_step} pairs ({steps * per_step / len(data.train):.2f} epochs)")
    if setup.resume is None:
        set_seed(t.seed + accelerator.process_index)
    with run.feedback(recipe, setup, opened.path) as log:
        return train_loop(Loop(setup, data, tokenizer, recipe, steps, per_step, log, say))


@dataclass
class Loop:
    setup: Setup
    data: PairData
    tokenizer: object
    recipe: RMRecipe
    steps: int
    per_step: int
    log: run.Log
    say: run.Say


def step_batches(loop: Loop, order: DataOrder, step: int) -> list[dict]:
    accelerator, micro = loop.setup.accelerator, loop.recipe.train.micro_batch_size
    slices = local_micro_batches(order.step_rows(step), accelerator.process_index, accelerator.num_processes, micro)
    return [loop.data.collate([loop.data.train[i] for i in rows]) for rows in slices]


def train_loop(loop: Loop) -> dict:
    setup, recipe, steps, t = loop.setup, loop.recipe, loop.steps, loop.recipe.train
    accelerator, cadence = setup.accelerator, run.Cadence(t, steps)
    order = DataOrder(len(loop.data.train), t.seed, loop.per_step)
    bar = progress_bar(steps, setup.start_step, recipe.output.progress and accelerator.is_main_process)
    guard = guards.NonFiniteGuard(t.max_nonfinite_steps, recipe.output.run_dir,
                                  int(setup.trainer_state.get("nonfinite_steps", 0)))
    window, clock = [], time.perf_counter()
    for step in range(setup.start_step, steps):
        result, done = train_step(setup, step_batches(loop, order, step), loop.per_step, recipe, loop.data), step + 1
        if result.pop("_skipped"):
            loop.say(guard.skipped(done, result))
        else:
            window.append(result)
        bar.update(1)
        if cadence.log(done) and window:
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            metrics.update({"train/lr": window[-1]["train/lr"],
                            "train/pairs_per_s": len(window) * loop.per_step / (time.perf_counter() - clock),
                            "train/epoch": done * loop.per_step / len(loop.data.train)})
            metrics.update(run.peak_memory(accelerator.device))
            loop.log(done, metrics, bar)
            window, clock = [], time.perf_counter()
        if cadence.eval(done):
            loop.log(done, evaluate(setup, loop.data, recipe)[0])
        if cadence.save(done):
            run.save_checkpoint(setup, done, loop.tokenizer, recipe,
                                {"rows_consumed": done * loop.per_step, "total_steps": steps,
                                 "world_size": accelerator.num_processes, "nonfinite_steps": guard.count})
    bar.close()
    return finish(loop)


def finish(loop: Loop) -> dict:
    """Final eval (with a per-kind accuracy when the eval rows have a `wrong` column), the final checkpoint."""
    metrics, gaps = evaluate(loop.setup, loop.data, loop.recipe)
    metrics.update(kind_accuracy(loop.data, gaps))
    loop.log(loop.steps, metrics)
    for key in sorted(metrics):
        loop.say(f"{key}: {metrics[key]:.4f}")
    if loop.recipe.output.merge:
        path = run.save_final(loop.setup, loop.tokenizer, loop.recipe, loop.steps)
        loop.say(f"final reward model (sequence classification, with tokenizer): {path}")
    return metrics


def kind_accuracy(data: PairData, gaps: list[float]) -> dict:
    """eval/accuracy/<kind> per value of the eval rows' `wrong` column (the synthetic pairs: borrow, near)."""
    rows = data.eval_rows
    if not rows or "wrong" not in rows[0] or len(rows) != len(gaps):
        return {}
    kinds: dict[str, list[bool]] = {}
    for row, gap in zip(rows, gaps, strict=True):
        kinds.setdefault(str(row["wrong"]), []).append(gap > 0)
    return {f"eval/accuracy/{k}": sum(v) / len(v) for k, v in sorted(kinds.items())}
