"""Evaluation: token-mean eval loss, and greedy exact match on chat prompts.

Both shard the rows over processes with equal counts (padding with masked copies), so every
process runs the same forwards; that keeps FSDP's collectives in step.

`generate` is the single switch point for decoding: a plain batched greedy loop of full forwards
(left padding, no cache; every process runs the same forwards, so it also works under FSDP), or,
with `engine=True`, the rollout engine align.generation.generate (latent KV cache; temperature 0)
for unsharded models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from align.kernels.linear_logprob import linear_nll_sum, trained_positions
from data_tools.chat import IGNORE_INDEX


def shard(items: Sequence, rank: int, world: int) -> tuple[list, int]:
    """Rank's strided share of `items`, padded (with copies of the first item) to ceil(n / world).

    Returns (share, number of real items in it)."""
    per_rank = -(-len(items) // world) if items else 0
    mine = list(items[rank::world])
    real = len(mine)
    if items:
        mine += [items[0]] * (per_rank - real)
    return mine, real


def fused_head(hidden: torch.Tensor, head: torch.nn.Module) -> bool:
    """Whether trained_token_loss takes the fused chunked head loss: CUDA, a plain bias-free Linear head."""
    return hidden.is_cuda and type(head) is torch.nn.Linear and head.bias is None


def trained_token_loss(model, batch: dict, n_items: int, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of the trained tokens / n_items, MoE balance loss or 0).

    With `head` (the output Linear, usable outside the wrapped forward: one process, or DDP with a
    frozen head), the head is applied only where a label is trained (a chat batch trains ~20% of its
    positions), found before the forward, so that reading their count waits on no queued work. On CUDA a
    plain Linear head goes through the fused chunked loss (linear_nll_sum: never the [trained tokens, vocab]
    logits, gigabytes at V2-Lite's vocabulary; the gradient taken in the forward); elsewhere, and for any
    other module (an adapter on the head), logits and cross-entropy (the path the tiny defaults' figures
    were measured on). Without it, the model's own causal-LM loss (all positions, the fused loss without
    logits). Same value every way."""
    if head is None:
        out = model(**batch, num_items_in_batch=n_items, return_logits=False)
        aux = out.aux_loss if out.aux_loss is not None else out.loss.new_zeros(())
        return out.loss - aux, aux
    index, targets = trained_positions(batch["labels"], IGNORE_INDEX)
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, return_logits=False)
    hidden = out.last_hidden_state.flatten(0, 1).index_select(0, index)  # [trained tokens, H]
    if fused_head(hidden, head):
        ce = linear_nll_sum(hidden, head.weight, targets) / n_items
    else:
        logits = head(hidden).to(torch.promote_types(hidden.dtype, torch.float32))  # [trained tokens, vocab]
        ce = F.cross_entropy(logits, targets, reduction="sum") / n_items
    aux = out.aux_loss if out.aux_loss is not None else ce.new_zeros(())
    return ce, aux


@torch.no_grad()
def eval_loss(
    model, rows: Sequence[Mapping], collate: Callable[[list], dict], batch_size: int, accelerator, head=None
) -> float:
    """Mean cross-entropy over every trained token of `rows` (all processes together)."""
    mine, real = shard(rows, accelerator.process_index, accelerator.num_processes)
    device = accelerator.device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, tokens]
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[start : start + batch_size]).items()}
        if start + batch_size > real:  # padding copies: keep the forward, drop their tokens
            first_fake = max(0, real - start)
            batch["labels"][first_fake:] = IGNORE_INDEX
        with accelerator.autocast():
            ce, _ = trained_token_loss(model, batch, 1, head)
        total[0] += ce.double()
        total[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    return (total[0] / total[1].clamp(min=1)).item()


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int,
    all_done: Callable[[bool], bool] = lambda done: done, autocast=None, engine: bool = False,
) -> list[list[int]]:
    """Greedy completions (token ids, EOS excluded) of each prompt; `all_done` lets processes agree
    on stopping (every process must run the same number of forwards under FSDP)."""
    if engine:
        from align.generation import generate as engine_generate

        results = engine_generate(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                                  temperature=0.0, eos_token_id=eos_id)
        return [[t for t in r[0].token_ids if t != eos_id] for r in results]
    return greedy_loop(model, prompts, max_new_tokens, eos_id, pad_id, all_done, autocast)


@torch.no_grad()
def greedy_loop(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int,
    all_done: Callable[[bool], bool], autocast=None,
) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
        out.append(token)
        finished |= token == eos_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~finished | (token == eos_id)).long()[:, None]], dim=1)
        if all_done(bool(finished.all())):
            break
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in tokens]


def prompt_and_answer(row: Mapping) -> tuple[object, str]:
    """(prompt, reference answer) of an eval row: `prompt` + `answer` columns, else the messages
    before the final assistant turn and that turn's content."""
    messages = row.get("messages")
    prompt = row.get("prompt")
    if prompt is None and messages:
        prompt = messages[:-1]
    answer = row.get("answer")
    if answer is None and messages and messages[-1].get("role") == "assistant":
        answer = messages[-1]["content"]
    if prompt is None or answer is None:
        raise ValueError(
            f"exact-match eval needs 'prompt' + 'answer' columns or 'messages' ending with an assistant "
            f"reply; got columns {sorted(row)}"
        )
    return prompt, str(answer)


def exact_match_eval(
    model, tokenizer, rows: Sequence[Mapping], max_new_tokens: int, batch_size: int, accelerator,
    engine: bool = False, keep: int = 5,
) -> tuple[float, list[dict]]:
    """Share of rows whose greedy reply has the reference answer (rewards.extract.last_number_matches),
    and the first `keep` examples {prompt, completion, answer, correct, row} of this process's share."""
    from data_tools.chat import render_prompt
    from data_tools.tokenizer import padding_id
    from rewards.extract import last_number_matches

    mine, real = shard(rows, accelerator.process_index, accelerator.num_processes)
    pad_id = padding_id(tokenizer)
    multi = accelerator.num_processes > 1

    def all_done(done: bool) -> bool:
        if not multi:
            return done
        flag = torch.tensor([0.0 if done else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() == 0

    was_training = model.training
    model.eval()
    correct, samples = 0, []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        pairs = [prompt_and_answer(r) for r in chunk]
        prompts = [render_prompt(tokenizer, p) for p, _ in pairs]
        completions = generate(model, prompts, max_new_tokens, tokenizer.eos_token_id, pad_id, all_done,
                               accelerator.autocast, engine)
        for i, ((prompt, answer), ids) in enumerate(zip(pairs, completions, strict=True)):
            if start + i >= real:
                continue
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ok = last_number_matches(text, answer)
            correct += ok
            if len(samples) < keep:
                samples.append({"prompt": prompt, "completion": text, "answer": answer, "correct": ok,
                                "row": chunk[i]})
    model.train(was_training)
    counts = torch.tensor([float(correct), float(real)], dtype=torch.float64, device=accelerator.device)
    if multi:
        counts = accelerator.reduce(counts, reduction="sum")
    return (counts[0] / counts[1].clamp(min=1)).item(), samples


def reward_eval(rewards, samples: Sequence[Mapping]) -> dict[str, float]:
    """The recipe's rewards on greedy eval completions (exact_match_eval's samples): eval/reward/mean (the
    weighted total) and eval/rewards/<label>/mean, as TRL passes rewards their inputs (conversational
    prompts get [{"role": "assistant", ...}] completions; the rows' other columns as keyword lists)."""
    from rewards import reward_metrics, score

    prompts = [s["prompt"] for s in samples]
    completions = [s["completion"] if isinstance(p, str) else [{"role": "assistant", "content": s["completion"]}]
                   for p, s in zip(prompts, samples, strict=True)]
    names = [k for k in samples[0]["row"] if k not in ("prompt", "messages")] if samples else []
    columns = {k: [s["row"].get(k) for s in samples] for k in names}
    totals, per_function, errors = score(rewards, prompts, completions, columns)
    metrics = reward_metrics(per_function, errors, totals)
    return {f"eval/{k}": v for k, v in metrics.items() if k.endswith("/mean")}
