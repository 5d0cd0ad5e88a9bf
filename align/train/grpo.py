"""GRPO from an SFT checkpoint: `align rl recipe.yaml [key=value ...]`.

One round (a "step" in logs and checkpoints):
1. `prompts_per_step` prompts, in an order that is a pure function of (seed, step);
2. `num_generations` completions each from the rollout engine (align.generation), run on the very
   model object being trained: LoRA adapters are live, no weight copy, no second engine;
3. rewards (rewards.registry: weighted TRL-signature functions; a reward that raises scores None);
4. group-relative advantages (align.train.advantages);
5. per-token log-probabilities of the completions by the fused LM-head log-prob kernel: old policy
   when num_iterations > 1, reference (adapters disabled for LoRA, a frozen copy for full FT) when
   beta > 0;
6. `num_iterations` optimizer steps, each over all completions in micro-batches, on the clipped
   surrogate + k3 KL loss (align.train.grpo_loss, TRL's definitions).

Model setup (LoRA or full, the reference), optimizer / scheduler, checkpoints and resume are the run
floor's (align.train.run, align.train.setup), as for SFT; the rollout seed is derived from (seed, step),
so a resumed run continues exactly as an uninterrupted one. `update` is the GRPO update on one round's
batch; benchmarks drive it with their own batches.

On N processes (accelerate launch / torchrun) each process rolls out, scores and trains its contiguous span
of the step's prompts, keyed by their index in the step, and what needs every row is gathered
(align.train.data_parallel, align.train.round_stats): an N-process run logs what one process would.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from align.recipe import GRPOSection, RLRecipe
from align.train import checkpointing as ckpt
from align.train import guards, rundir
from align.train.data_parallel import Gather, gatherer, shared_failure, step_span
from align.train.dynamic_sampling import fill_groups
from align.train.evaluate import exact_match_eval, reward_eval
from align.train.grpo_loss import GRPOLossConfig, grpo_loss, mask_truncated_completions
from align.train.metrics import progress_bar
from align.train.moe_metrics import MoEMetrics
from align.train.order import DataOrder
from align.train.rollout_batch import RolloutBatch, completion_logprobs, make_batch, policy_pass
from align.train.round_stats import advantage_metrics, completion_metrics, reward_summary, round_advantages
from align.train.run import (
    Cadence,
    Log,
    Say,
    deterministic_algorithms,
    feedback,
    load_tokenizer_for,
    make_accelerator,
    prepare_run,
    save_checkpoint,
    save_final,
    synthetic_files,
    write_recipe,
)
from align.train.setup import Setup, setup_model
from data_tools.tokenizer import padding_id

# ------------------------------------------------------------------------------------------ data


@dataclass
class PromptData:
    train: list[dict]  # {"prompt": as given, "prompt_ids": [...], **other columns}
    eval_rows: list[dict]  # rows for exact match (prompt + answer, or messages)


def tokenize_prompts(rows, tokenizer, recipe: RLRecipe, source: str, say) -> list[dict]:
    """Render each row's prompt with the chat template's generation prompt (or BOS + text).

    A prompt longer than max_prompt_length keeps its last tokens; a malformed row is an error naming
    the file and row (or, with data.on_error=skip, skipped and counted)."""
    from data_tools.chat import render_prompt

    d = recipe.data
    out, truncated, skipped = [], 0, 0
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        try:
            if d.prompt_column not in row or row[d.prompt_column] is None:
                present = sorted(k for k, v in row.items() if v is not None)
                raise ValueError(f"{where}: no '{d.prompt_column}' column (columns: {', '.join(present)}); "
                                 f"set data.prompt_column")
            ids = render_prompt(tokenizer, row[d.prompt_column], where=f"{where} '{d.prompt_column}'")
        except ValueError:
            if d.on_error == "raise":
                raise
            skipped += 1
            continue
        if len(ids) > d.max_prompt_length:
            ids, truncated = ids[-d.max_prompt_length :], truncated + 1
        columns = {k: v for k, v in row.items() if k not in (d.prompt_column, "messages")}
        out.append({"prompt": row[d.prompt_column], "prompt_ids": ids, **columns})
    lengths = sorted(len(r["prompt_ids"]) for r in out) or [0]
    say(f"prompts {source}: {len(out)} rows, {truncated} left-truncated to {d.max_prompt_length} tokens, "
        f"{skipped} skipped; length min {lengths[0]} / p50 {lengths[len(lengths) // 2]} / max {lengths[-1]}")
    if not out:
        raise ValueError(f"{source}: no usable prompt row")
    return out


def prepare_prompts(recipe: RLRecipe, tokenizer, accelerator: Accelerator, say) -> PromptData:
    from data_tools.datasets import load_rows

    d = recipe.data
    if d.synthetic is not None:
        train_path, eval_path = synthetic_files(recipe, accelerator)
        train, evals, source = load_rows(train_path), load_rows(eval_path), str(train_path)
    else:
        train, source = load_rows(d.train, d.train_split, d.on_error), str(d.train)
        evals = load_rows(d.eval, d.eval_split, d.on_error) if d.eval is not None else None
    return PromptData(tokenize_prompts(train, tokenizer, recipe, source, say), list(evals) if evals else [])


# ----------------------------------------------------------------------------------------- model


def loss_config(g: GRPOSection) -> GRPOLossConfig:
    return GRPOLossConfig(
        beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, delta=g.delta, loss_type=g.loss_type,
        importance_sampling_level=g.importance_sampling_level, max_completion_length=g.max_completion_length,
        sapo_temperature_neg=g.sapo_temperature_neg, sapo_temperature_pos=g.sapo_temperature_pos,
        top_entropy_quantile=g.top_entropy_quantile,
    )


# --------------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    rows: list[dict]  # one per completion (each prompt's row repeated G times, consecutive)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finish: list[str]  # "stop" | "length"
    sample_logprobs: list[list[float]]  # from the engine, at the sampling temperature
    texts: list[str]
    routing: list | None = None  # per completion, the engine's experts [fed positions, moe_layers, k] (MoE)

    @classmethod
    def take(cls, parts: list[tuple[Rollout, list[int]]], group: int) -> Rollout:
        """The rows of the listed groups (consecutive `group` rows) of each rollout, in order."""
        rows = [(ro, i) for ro, groups in parts for g in groups for i in range(g * group, (g + 1) * group)]
        routed = all(ro.routing is not None for ro, _ in parts)
        return cls(
            rows=[ro.rows[i] for ro, i in rows], prompt_ids=[ro.prompt_ids[i] for ro, i in rows],
            completion_ids=[ro.completion_ids[i] for ro, i in rows], finish=[ro.finish[i] for ro, i in rows],
            sample_logprobs=[ro.sample_logprobs[i] for ro, i in rows], texts=[ro.texts[i] for ro, i in rows],
            routing=[ro.routing[i] for ro, i in rows] if routed else None,
        )


def rollout(engine, rows: Sequence[dict], recipe: RLRecipe, step: int, tokenizer, round_: int = 0,
            keys: Sequence[int] | None = None) -> Rollout:
    """G completions per prompt from the engine; seeded by (train seed, step, round: dynamic sampling's), each
    prompt's noise keyed by its position in the step (keys: this process's positions; default 0, 1, ...)."""
    g = recipe.grpo
    results = engine.generate(
        [r["prompt_ids"] for r in rows], max_new_tokens=g.max_completion_length, temperature=g.temperature,
        top_p=g.top_p, top_k=g.top_k, n=g.num_generations, eos_token_id=tokenizer.eos_token_id,
        seed=recipe.train.seed * 1_000_003 + step + round_ * 100_000_007, record_routing=True,
        prompt_keys=None if keys is None else list(keys),
    )
    flat = [(row, c) for row, completions in zip(rows, results, strict=True) for c in completions]
    return Rollout(
        rows=[row for row, _ in flat], prompt_ids=[row["prompt_ids"] for row, _ in flat],
        completion_ids=[c.token_ids for _, c in flat], finish=[c.finish_reason for _, c in flat],
        sample_logprobs=[c.logprobs for _, c in flat],
        texts=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for _, c in flat],
        routing=[c.routing for _, c in flat] if flat and flat[0][1].routing is not None else None,
    )


def reward_inputs(ro: Rollout, prompt_column: str) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, columns) as TRL passes them: conversational prompts get
    [{"role": "assistant", "content": text}] completions; extra columns become keyword lists."""
    prompts = [row["prompt"] for row in ro.rows]
    conversational = bool(prompts) and not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] if conversational else t for t in ro.texts]
    names = [k for k in ro.rows[0] if k not in ("prompt", "prompt_ids")]
    columns = {k: [row.get(k) for row in ro.rows] for k in names}
    columns["completion_ids"] = ro.completion_ids
    return prompts, completions, columns


def score_local(rewards, ro: Rollout, recipe: RLRecipe) -> tuple[torch.Tensor, tuple[list, dict, dict]]:
    """(weighted total reward per completion, (totals, per-function scores, errors)) of this process's rows."""
    from rewards import score

    prompts, completions, columns = reward_inputs(ro, recipe.data.prompt_column)
    totals, per_function, errors = score(rewards, prompts, completions, columns)
    return torch.tensor(totals, dtype=torch.float32), (totals, per_function, errors)


# ---------------------------------------------------------------------------------------- update


def batch_for(ro: Rollout, advantages: torch.Tensor, recipe: RLRecipe, tokenizer, device) -> RolloutBatch:
    eos = [tokenizer.eos_token_id]

    def truncated_off(comp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask_truncated_completions(comp, mask, eos)

    pad = padding_id(tokenizer)
    fn = truncated_off if recipe.grpo.mask_truncated_completions else None
    return make_batch(ro.prompt_ids, ro.completion_ids, advantages, pad, fn, device, ro.sample_logprobs, ro.routing)


@torch.no_grad()
def frozen_logprobs(model, head, batch: RolloutBatch, g: GRPOSection, accelerator,
                    replay: bool = False) -> torch.Tensor:
    """Log-probs without gradient (old policy, reference), micro-batch by micro-batch; replay: route by
    the rollout's recorded experts (the old policy under grpo.routing_replay: rollout)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(batch), g.micro_batch_size):
        part = batch.rows(start, start + g.micro_batch_size)
        with accelerator.autocast():
            lp = completion_logprobs(model, head, part, g.temperature, replay)
        parts.append(torch.nn.functional.pad(lp, (0, batch.completion_ids.shape[1] - lp.shape[1])))
    model.train(was_training)
    return torch.cat(parts)


def add_old_and_ref(setup: Setup, head, batch: RolloutBatch, g: GRPOSection) -> None:
    if g.num_iterations > 1:
        batch.old_logps = frozen_logprobs(setup.model, head, batch, g, setup.accelerator, replays(g, batch))
    if g.beta > 0:  # the reference routes by itself: it is another model
        with setup.reference() as ref:
            batch.ref_logps = frozen_logprobs(ref, ref.get_output_embeddings(), batch, g, setup.accelerator)


def replays(g: GRPOSection, batch: RolloutBatch) -> bool:
    """Whether the policy's forwards replay the rollout's routing (grpo.routing_replay, a MoE rollout)."""
    return g.routing_replay == "rollout" and batch.routing is not None


def optimizer_step(setup: Setup, batch: RolloutBatch, cfg: GRPOLossConfig, g: GRPOSection, max_grad_norm: float | None,
                   head, observe: MoEMetrics | None = None, gather: Gather = list) -> tuple[dict[str, float], bool]:
    """One optimizer step over every completion of the round (gradient accumulation over micro-batches):
    (its metrics, whether it was skipped: not applied because the loss or gradient norm is NaN / inf).
    The MoE balance loss (train.aux_loss_alpha, in training mode) is added per micro-batch / their count,
    as TRL adds router_aux_loss_coef · aux; observe: collects the routing metrics of these forwards.
    Several processes (DDP / FSDP average their gradients): dapo's token count is the global batch's and the
    loss is scaled as TRL scales it per process, so the update and the metrics are one process's."""
    accelerator, size = setup.accelerator, g.micro_batch_size
    starts = list(range(0, len(batch), size))
    n_items = batch.loss_mask.sum()  # dapo's token count: of the global batch (all-reduced on the device)
    if accelerator.num_processes > 1:
        n_items = accelerator.reduce(n_items, reduction="sum")
    total, parts = 0.0, []
    for m, start in enumerate(starts):
        part = batch.rows(start, start + size)
        with setup.grad_sync(m == len(starts) - 1):  # forward and backward: DDP reads it in both
            out, loss, metrics = micro_batch_loss(setup, head, part, cfg, g, n_items, len(starts), observe)
            accelerator.backward(loss)
        total += loss.item()  # micro-batch losses sum to the step's objective
        metrics["entropy"] = (out.entropy * part.token_mask).sum() / part.token_mask.sum().clamp(min=1)
        parts.append((part.loss_mask.sum().item(), {k: v.item() for k, v in metrics.items()}))
        if observe is not None:
            observe.add(out, part)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    totals = gather([total])  # each process's share of the objective, scaled for DDP's average
    total = sum(totals) / len(totals)
    skipped = guards.any_nonfinite(torch.tensor([total, norm]), accelerator)
    if not skipped:
        setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": norm, **merge_metrics(gather(parts))}, bool(skipped)


def micro_batch_loss(setup: Setup, head, part: RolloutBatch, cfg: GRPOLossConfig, g: GRPOSection, n_items,
                     micro_batches: int, observe: MoEMetrics | None):
    """(policy pass, loss, metrics) of one micro-batch of `micro_batches`."""
    with setup.accelerator.autocast():
        out = policy_pass(setup.model, head, part, g.temperature, replay=replays(g, part), observe=observe is not None)
    loss, metrics = grpo_loss(
        out.logps, part.old_logps, part.ref_logps, part.advantages, part.loss_mask, cfg, n_items,
        grad_accum_steps=micro_batches, num_processes=setup.accelerator.num_processes, entropies=out.entropy,
    )
    if out.aux_loss is not None:
        loss = loss + out.aux_loss / micro_batches
        metrics["aux_loss"] = out.aux_loss.detach()
    return out, loss, metrics


UNWEIGHTED = ("aux_loss",)  # per micro-batch values the loss averages with equal weights


def merge_metrics(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Micro-batch metrics -> step metrics: *_min / *_max by min / max, the balance loss by the plain mean
    the loss takes (so it does not depend on which rows share a micro-batch), the rest token-weighted."""
    out: dict[str, float] = {}
    weight = sum(w for w, _ in parts) or 1.0
    for key in parts[0][1]:
        values = [(w, m[key]) for w, m in parts if not math.isnan(m[key])]
        if not values:
            out[key] = math.nan
        elif key.endswith("_min") or key.endswith("_max"):
            out[key] = (min if key.endswith("_min") else max)(v for _, v in values)
        elif key in UNWEIGHTED:
            out[key] = sum(v for _, v in values) / len(values)
        else:
            out[key] = sum(w * v for w, v in values) / weight
    return out


def order_free(g: GRPOSection, rows: int) -> bool:
    """Whether the update's step is the same whichever rows share a micro-batch: dapo / cispo normalise by
    the whole batch's tokens; grpo / sapo / dr_grpo by each micro-batch's rows, the same when every
    micro-batch is full; bnpo by each micro-batch's tokens, never."""
    if g.loss_type in ("dapo", "cispo"):
        return True
    return g.loss_type != "bnpo" and rows % g.micro_batch_size == 0


def update(setup: Setup, batch: RolloutBatch, g: GRPOSection, max_grad_norm: float | None,
           gather: Gather = list, by_length: bool | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The GRPO update of one round: old-policy / reference log-probs when needed, then num_iterations
    optimizer steps over `batch`. Returns the mean of their metrics (with the first step's routing
    metrics, align.train.moe_metrics, under their own `policy/` and `moe/` names), and the loss / grad
    norm of each step that was not applied (NaN / inf). The batch's recorded routing is freed after.
    gather (align.train.data_parallel.gatherer): with several processes, their metrics are combined.
    by_length: micro-batch the rows in length order (RolloutBatch.by_length), so that a micro-batch is
    padded to about its own rows' length, not to the round's longest completion. Default: on CUDA where
    the step and every metric stay the same (`order_free`); off on the CPU, which keeps the tiny
    recipes' recorded numerics."""
    head = setup.unwrapped.get_output_embeddings()
    if by_length is None:
        by_length = batch.input_ids.is_cuda and order_free(g, len(batch))
    if by_length:
        ordered = batch.by_length()
        batch.routing = None  # the caller's copy is freed now; the ordered copy is freed after the steps
        batch = ordered
    add_old_and_ref(setup, head, batch, g)
    cfg = loss_config(g)
    observe = MoEMetrics(setup.unwrapped.config)
    steps = [optimizer_step(setup, batch, cfg, g, max_grad_norm, head, observe if i == 0 else None, gather)
             for i in range(g.num_iterations)]
    batch.routing = None
    runs = [r for r, _ in steps]
    skipped = [{"train/loss": r["loss"], "train/grad_norm": r["grad_norm"]} for r, was in steps if was]
    out = {k: _nanmean([r[k] for r in runs]) for k in runs[0]}
    out["lr"] = setup.optimizer.param_groups[0]["lr"]
    out.update(observe.summary(gather))
    return out, skipped


# ------------------------------------------------------------------------------------ main loop


def run_rl(recipe: RLRecipe) -> dict:
    """Train per the recipe; returns the final metrics (eval/exact_match when enabled)."""
    with deterministic_algorithms(recipe.train.deterministic):
        return _run_rl(recipe)


@dataclass
class Run:
    setup: Setup
    engine: object
    rewards: list
    data: PromptData
    tokenizer: object
    recipe: RLRecipe
    log: Log
    say: Say
    span: range  # this process's positions in each step's prompts (data_parallel.step_span)
    gather: Gather  # every process's values (data_parallel.gatherer)


def _run_rl(recipe: RLRecipe) -> dict:
    from align.generation import GenerationEngine

    accelerator = make_accelerator(recipe)
    g, t = recipe.grpo, recipe.train
    span = step_span(g.prompts_per_step, accelerator)
    if accelerator.num_processes > 1 and g.dynamic_sampling:
        raise ValueError("grpo.dynamic_sampling runs in one process for now (its extra rounds would give the "
                         "processes different micro-batch counts); set grpo.dynamic_sampling=false or launch "
                         "one process")
    opened, say = prepare_run(recipe, accelerator)
    with rundir.removed_on_failure(opened, accelerator):
        tokenizer = load_tokenizer_for(recipe)
        data = prepare_prompts(recipe, tokenizer, accelerator, say)
        rewards = recipe.reward_functions()
        setup = setup_model(recipe, tokenizer, accelerator, t.steps * g.num_iterations, g.prompts_per_step,
                            say, opened.resume, run_steps=t.steps)
        write_recipe(opened, recipe, accelerator)
    engine = GenerationEngine(setup.model, max_batch=g.rollout_batch)
    say(f"{accelerator.num_processes} process(es), {setup.distribution}, {len(span)} prompts each per round")
    say(f"GRPO: {t.steps} rounds of {g.prompts_per_step} prompts x {g.num_generations} completions "
        f"(<= {g.max_completion_length} tokens), {g.num_iterations} optimizer step(s) each, loss {g.loss_type}, "
        f"beta {g.beta}; rewards: {', '.join(f'{r.name} x{r.weight:g}' for r in rewards)}; device {accelerator.device}")
    if setup.resume is None:
        torch.manual_seed(t.seed)
    if g.beta > 0:
        setup.keep_reference(recipe)
    with feedback(recipe, setup, opened.path) as log:
        return train_loop(Run(setup, engine, rewards, data, tokenizer, recipe, log, say, span, gatherer(accelerator)))


OWN_NAMES = ("policy/", "moe/")  # update metrics logged under their own names, not train/


@dataclass
class Round:
    """What one GRPO round produced: its metrics, its rollout and rewards (for completions.jsonl), the
    loss / grad norm of updates not applied (NaN / inf), and why no reward value came (None if one did)."""

    metrics: dict
    rollout: Rollout
    reward: torch.Tensor
    skipped: list[dict[str, float]]
    reward_failure: str | None


def rl_step(run: Run, step: int, order: DataOrder) -> Round:
    """One round: rollout, rewards, advantages, update."""
    recipe = run.recipe
    clock = time.perf_counter()
    rows = order.step_rows(step)
    with shared_failure(run.setup.accelerator, f"step {step + 1}: the rollout or its rewards"):
        with run.setup.whole_weights():
            ro = rollout(run.engine, [run.data.train[rows[i]] for i in run.span], recipe, step, run.tokenizer,
                         keys=run.span)
        generated = time.perf_counter()
        reward, scores = score_local(run.rewards, ro, recipe)
    metrics, failure = reward_summary(run.gather([scores]))
    if recipe.grpo.dynamic_sampling:  # extra rounds: generation and scoring, timed together
        topped = time.perf_counter()
        ro, reward, sampled = dynamic_round(run, step, order, ro, reward)
        metrics.update({**sampled, "time/dynamic_sampling": time.perf_counter() - topped})
    everything, advantages = round_advantages(reward, recipe, run.gather, run.setup.accelerator.process_index)
    scored = time.perf_counter()
    batch = batch_for(ro, advantages[1], recipe, run.tokenizer, run.setup.accelerator.device)
    ro.routing = None  # the batch holds it until the update frees it
    updates, skipped = update(run.setup, batch, recipe.grpo, recipe.train.max_grad_norm, run.gather)
    done = time.perf_counter()
    metrics.update({k if k.startswith(OWN_NAMES) else f"train/{k}": v for k, v in updates.items()})
    metrics.update(advantage_metrics(everything, advantages[0], recipe))
    metrics.update(completion_metrics(ro.completion_ids, ro.finish, ro.sample_logprobs, batch.loss_mask.cpu(),
                                      run.gather))
    # every process's completions over the slowest process's generation phase: the run's rate
    phases = run.gather([(sum(len(c) for c in ro.completion_ids), generated - clock)])
    tokens, generation_s = sum(t for t, _ in phases), max(s for _, s in phases)
    metrics.update({"time/generation": generation_s, "time/scoring": scored - generated,
                    "time/update": done - scored, "time/step": done - clock,
                    "time/generated_tokens_per_s": tokens / max(generation_s, 1e-9)})
    return Round(metrics, ro, reward, skipped, failure)


def dynamic_round(run: Run, step: int, order: DataOrder, ro: Rollout,
                  reward: torch.Tensor) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """Dynamic sampling (align.train.dynamic_sampling): the step's informative groups, topped up by
    extra rounds. Reward metrics stay those of the first round."""
    g = run.recipe.grpo

    def sample(round_: int) -> tuple[Rollout, torch.Tensor]:
        rows = [run.data.train[i] for i in order.extra_rows(step, round_)]
        extra = rollout(run.engine, rows, run.recipe, step, run.tokenizer, round_)
        return extra, score_local(run.rewards, extra, run.recipe)[0]

    return fill_groups((ro, reward), sample, lambda parts: Rollout.take(parts, g.num_generations),
                       g.prompts_per_step, g.num_generations, g.max_sampling_rounds, run.setup.accelerator)


def write_samples(run: Run, step: int, ro: Rollout, reward: torch.Tensor) -> None:
    """Append the first prompts of the round, with every completion and its reward, to completions.jsonl."""
    if not run.setup.accelerator.is_main_process:  # its rows are the step's first prompts
        return
    g = run.recipe.grpo.num_generations
    n = min(run.recipe.train.samples_per_log, len(ro.rows) // g) * g
    with (Path(run.recipe.output.run_dir) / "completions.jsonl").open("a", encoding="utf-8") as f:
        for i in range(0, n, g):
            row = {"step": step, "prompt": ro.rows[i]["prompt"],
                   "completions": [{"text": ro.texts[j], "reward": _json_number(reward[j].item()),
                                    "finish_reason": ro.finish[j]} for j in range(i, i + g)]}
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def exact_match(run: Run) -> dict[str, float]:
    e = run.recipe.eval
    if not (e.exact_match and run.data.eval_rows):
        return {}
    rows = run.data.eval_rows[: e.samples] if e.samples else run.data.eval_rows
    with run.setup.whole_weights() if e.engine else nullcontext():
        score, samples = exact_match_eval(run.setup.unwrapped, run.tokenizer, rows, e.max_new_tokens,
                                          e.batch_size, run.setup.accelerator, engine=e.engine,
                                          keep=len(rows) if e.rewards else 5)
    return {"eval/exact_match": score, **(reward_eval(run.rewards, samples) if e.rewards else {})}


def reward_note(metrics: dict) -> str:
    """' (reward 0.123; reward_model 0.456, ...)' of an eval with eval.rewards, else ''."""
    if "eval/reward/mean" not in metrics:
        return ""
    parts = [f"{k.split('/')[2]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/rewards/")]
    return f" (reward {metrics['eval/reward/mean']:.3f}; {', '.join(parts)})"


def train_loop(run: Run) -> dict:
    recipe, t = run.recipe, run.recipe.train
    start, cadence = run.setup.start_step, Cadence(t, t.steps)
    first = exact_match(run) if start == 0 else {}
    if first:
        run.log.writer.write(0, first)
        run.say(f"exact match before RL: {first['eval/exact_match']:.1%}{reward_note(first)}")
    order = DataOrder(len(run.data.train), t.seed, recipe.grpo.prompts_per_step)
    bar = progress_bar(t.steps, start, recipe.output.progress, desc="rl")
    watch = Watch.resumed(run)
    window: list[dict] = []
    for step in range(start, t.steps):
        round_ = rl_step(run, step, order)
        done = step + 1
        watch.check(run, done, round_)  # warns, or stops the run
        window.append(round_.metrics)
        bar.update(1)
        if t.sample_every and done % t.sample_every == 0:
            write_samples(run, done, round_.rollout, round_.reward)
        if cadence.log(done):
            run.log(done, window_metrics(window), bar)
            window = []
        if cadence.eval(done):
            run.log(done, exact_match(run))
        if cadence.save(done):
            save_checkpoint(run.setup, done, run.tokenizer, recipe,
                            {"rows_consumed": done * recipe.grpo.prompts_per_step, "total_steps": t.steps,
                             "world_size": run.setup.accelerator.num_processes, **watch.state()})
    bar.close()
    return finish(run, first, watch)


@dataclass
class Watch:
    """What stops a GRPO run (NaN / inf updates, rounds without reward values) and the reward error totals."""

    nonfinite: guards.NonFiniteGuard
    rewards: guards.RewardGuard
    reward_errors: Counter  # rounds in which each reward function raised

    @classmethod
    def resumed(cls, run: Run) -> Watch:
        saved, recipe = run.setup.trainer_state, run.recipe
        nonfinite = guards.NonFiniteGuard(recipe.train.max_nonfinite_steps, recipe.output.run_dir,
                                          int(saved.get("nonfinite_steps", 0)))
        return cls(nonfinite, guards.RewardGuard(recipe.grpo.max_failed_reward_steps),
                   Counter(saved.get("reward_errors", {})))

    def check(self, run: Run, step: int, round_: Round) -> None:
        """Warnings printed, TrainingStopped past a limit, reward errors counted."""
        warning = self.rewards.record(step, round_.reward_failure)
        if warning:
            run.say(warning)
        for values in round_.skipped:
            run.say(self.nonfinite.skipped(step, values))
        metrics = round_.metrics
        if self.nonfinite.count:
            metrics["train/nonfinite_steps"] = self.nonfinite.count
        self.reward_errors.update({k[len("rewards/"):-len("/errors")]: int(v) for k, v in metrics.items()
                                   if k.startswith("rewards/") and k.endswith("/errors")})

    def state(self) -> dict:
        return {"nonfinite_steps": self.nonfinite.count, "reward_errors": dict(self.reward_errors)}


def window_metrics(window: list[dict]) -> dict[str, float]:
    """The log record of several rounds: `rewards/<name>/errors` summed (rounds in which the reward
    raised), the counter train/nonfinite_steps its latest value, every other key its mean without NaN."""
    out = {}
    for key in dict.fromkeys(k for w in window for k in w):
        values = [w[key] for w in window if key in w]
        if key.endswith("/errors"):
            out[key] = float(sum(values))
        else:
            out[key] = values[-1] if key == "train/nonfinite_steps" else _nanmean(values)
    return out


def _json_number(value: float) -> float | None:
    """NaN (a completion no reward scored) as null: completions.jsonl stays strict JSON."""
    return None if math.isnan(value) else value


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def finish(run: Run, first: dict, watch: Watch) -> dict:
    recipe = run.recipe
    last = exact_match(run)
    totals = {f"rewards/{r.name}/errors_total": float(watch.reward_errors[r.name]) for r in run.rewards}
    run.log(recipe.train.steps, {**last, **totals})
    raised = [f"{name} in {n} of {recipe.train.steps} rounds" for name, n in watch.reward_errors.items() if n]
    if raised:
        run.say(f"reward errors (the function raised; the round scored it None): {', '.join(raised)}")
    if last:
        before = f"{first['eval/exact_match']:.1%} before RL, " if first else ""
        run.say(f"eval exact match: {before}{last['eval/exact_match']:.1%} after {recipe.train.steps} steps")
        if "eval/reward/mean" in last:
            run.say(f"eval reward before RL:{reward_note(first) or ' (not measured)'}; after:{reward_note(last)}")
    run.say(f"checkpoint: {ckpt.checkpoint_dir(recipe.output.run_dir, recipe.train.steps)}")
    if recipe.output.merge:
        out = save_final(run.setup, run.tokenizer, recipe, recipe.train.steps)
        run.say(f"final model (merged, with tokenizer): {out}")
    return {**{f"start/{k}": v for k, v in first.items()}, **last, **totals}
