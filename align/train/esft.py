"""ESFT (Expert-Specialized Fine-Tuning, DeepSeek): score the routed experts on the task, pick each
layer's few experts the task uses, and train only those.

Scoring pass: the base model runs (no gradient) over a sample of the training rows (`esft.sample_tokens`
non-padding tokens, whole rows taken in the seeded order of epoch 0), each process over its share; for
MoE layer l and expert e, per sample j (a document: a row, or a packed document) of L_j tokens:
    token score  r[l, e] = mean_j (1 / L_j) sum_t 1(e in top-k(t)) / k
    gate score   g[l, e] = mean_j (1 / L_j) sum_t gate weight of e at t (0 when not chosen)
The sums and the sample count are all-reduced, so every process holds the same totals; the main process
writes `<run_dir>/esft_experts.json` and every process reads the choice back from it (one source of truth,
also for resume). Selection, per layer: the scores as shares of the layer's total (DeepSeek's
generate_expert_config.py normalises them too; the token score already sums to 1), experts by share
descending (ties: lower id first), the shortest prefix whose cumulative share reaches `esft.top_p`.

How the chosen experts train is align/models/expert_slices.py (their slices as parameters of their own).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from align.models.config import moe_layers
from align.models.expert_slices import SlicedExperts, slice_experts
from align.models.moe import RoutingTrace
from align.train.metrics import progress_bar
from align.train.order import DataOrder

EXPERTS_FILE = "esft_experts.json"
SCORES = ("token", "gate")


@dataclass
class Choice:
    """The experts ESFT trains: layer index -> expert ids, and how they were chosen."""

    score: str
    top_p: float
    layers: dict[int, list[int]]
    scores: dict[str, dict[int, list[float]]]  # score name -> layer -> share of each expert
    tokens: int  # tokens scored
    samples: int

    def to_json(self) -> dict:
        return {"score": self.score, "top_p": self.top_p, "tokens": self.tokens, "samples": self.samples,
                "layers": {str(k): v for k, v in self.layers.items()},
                "scores": {name: {str(k): [round(x, 6) for x in v] for k, v in per.items()}
                           for name, per in self.scores.items()}}

    def summary(self, n_experts: int) -> str:
        chosen = sum(len(v) for v in self.layers.values())
        total = n_experts * len(self.layers)
        return (f"ESFT: {chosen} of {total} routed experts ({chosen / total:.1%}) by {self.score} score, "
                f"top_p {self.top_p}, from {self.tokens:,} tokens in {self.samples:,} samples")


def read_choice(path: Path) -> Choice:
    """esft_experts.json; a malformed file is an error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = {int(k): [int(e) for e in v] for k, v in data["layers"].items()}
        scores = {n: {int(k): [float(x) for x in v] for k, v in per.items()} for n, per in data["scores"].items()}
        return Choice(data["score"], float(data["top_p"]), layers, scores, int(data["tokens"]), int(data["samples"]))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing; an ESFT checkpoint keeps the experts it trains there") from err
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not an ESFT expert file ({type(err).__name__}: {err}); expected "
                         '{"score", "top_p", "tokens", "samples", "layers": {"<layer>": [ids]}, "scores"}') from err


def write_choice(choice: Choice, path: Path) -> None:
    """Atomically (a temporary name, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in choice.to_json().items()]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- scoring pass


def sample_rows(tokens: list[int], budget: int, seed: int) -> list[int]:
    """Row indices in epoch 0's seeded order until `budget` tokens are reached (all rows if fewer)."""
    taken, total = [], 0
    for i in DataOrder(len(tokens), seed, max(len(tokens), 1)).step_rows(0) if tokens else []:
        if total >= budget:
            break
        taken.append(i)
        total += tokens[i]
    return taken


def sample_weights(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(per token 1 / L_j of its sample j, 0 on padding [B*S] float64; samples in the batch). A sample
    starts at a row's first token and wherever position_ids restart (packed documents)."""
    mask = batch["attention_mask"].bool()
    starts = torch.zeros_like(mask)
    if "position_ids" in batch:
        starts = batch["position_ids"] == 0
    starts[:, 0] = True
    starts, mask = (starts & mask).reshape(-1), mask.reshape(-1)
    sample = torch.cumsum(starts.long(), 0) - 1  # [B*S] sample index of each token
    n = int(starts.sum())
    length = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(
        0, sample[mask], torch.ones(int(mask.sum()), dtype=torch.float64, device=mask.device))
    inverse = torch.zeros(mask.numel(), dtype=torch.float64, device=mask.device)
    inverse[mask] = 1.0 / length[sample[mask]]
    return inverse, n


@torch.no_grad()
def score_batch(model: nn.Module, batch: dict[str, torch.Tensor], layers: list[int], sums: torch.Tensor) -> int:
    """Add one batch's token and gate score sums into sums [layers, 2, E]; returns its samples."""
    inverse, n = sample_weights(batch)
    trace = RoutingTrace()
    model.model(**{k: v for k, v in batch.items() if k != "labels"}, routing=trace)
    for li, layer in enumerate(layers):
        routing = trace.layers[layer]
        k = routing.experts.shape[1]
        ids = routing.experts.reshape(-1)
        sums[li, 0].index_add_(0, ids, (inverse[:, None] / k).expand(-1, k).reshape(-1))
        sums[li, 1].index_add_(0, ids, (routing.weights.double() * inverse[:, None]).reshape(-1))
    return n


def score_experts(model: nn.Module, task, sample_tokens: int, seed: int, batch_size: int, accelerator,
                  progress: bool) -> tuple[torch.Tensor, int, int]:
    """(score sums [layers, 2, E] float64, samples, tokens), all processes together."""
    rows = sample_rows(task.tokens, sample_tokens, seed)
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    layers, n_experts = moe_layers(model.config), model.config.n_routed_experts
    if not layers:
        raise ValueError("esft: the model has no MoE layer; ESFT trains routed experts")
    sums = torch.zeros(len(layers), 2, n_experts, dtype=torch.float64, device=accelerator.device)
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [samples, tokens]
    was_training = model.training
    model.eval()
    starts = range(0, len(mine), batch_size)
    bar = progress_bar(len(starts), 0, progress and accelerator.is_main_process, desc="esft scoring")
    for start in starts:
        part = mine[start : start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in task.collate([task.train[i] for i in part]).items()}
        with accelerator.autocast():
            counts[0] += score_batch(model, batch, layers, sums)
        counts[1] += sum(task.tokens[i] for i in part)
        bar.update(1)
    bar.close()
    model.train(was_training)
    if accelerator.num_processes > 1:
        sums, counts = accelerator.reduce(sums, reduction="sum"), accelerator.reduce(counts, reduction="sum")
    return sums, int(counts[0]), int(counts[1])


# -------------------------------------------------------------------------------------- selection


def shares(sums: torch.Tensor) -> torch.Tensor:
    """Scores [..., E] as shares of each layer's total."""
    return sums / sums.sum(-1, keepdim=True).clamp(min=torch.finfo(sums.dtype).tiny)


def top_p_experts(share: list[float], top_p: float) -> list[int]:
    """The shortest prefix of experts by share (descending, ties by id) whose cumulative share reaches top_p."""
    chosen, total = [], 0.0
    for expert in sorted(range(len(share)), key=lambda e: (-share[e], e)):
        if total >= top_p:
            break
        chosen.append(expert)
        total += share[expert]
    return sorted(chosen)


def choose(sums: torch.Tensor, layers: list[int], score: str, top_p: float, samples: int, tokens: int) -> Choice:
    if samples == 0:
        raise ValueError("esft: the scoring pass saw no tokens; the training data is empty")
    share = {name: shares(sums[:, i]).tolist() for i, name in enumerate(SCORES)}
    per_layer = {name: dict(zip(layers, share[name], strict=True)) for name in SCORES}
    picked = {layer: top_p_experts(per_layer[score][layer], top_p) for layer in layers}
    return Choice(score, top_p, picked, per_layer, tokens, samples)


# -------------------------------------------------------------------------------------- the model


def freeze_for_esft(model: nn.Module, choice: Choice, shared_experts: bool, non_expert: bool) -> list[SlicedExperts]:
    """Everything frozen but the chosen experts' slices (+ shared experts / non-expert modules when asked);
    the router gate counts as a non-expert module."""
    for name, param in model.named_parameters():
        shared = ".shared_experts." in name
        routed = ".mlp.experts." in name
        param.requires_grad_((shared and shared_experts) or (not shared and not routed and non_expert))
    return list(slice_experts(model, choice.layers).values())


def tuned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of an ESFT model by name (what a step checkpoint keeps of the weights)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the plain layout (the tuned slices are already in the stacked tensors)."""
    return {k: v for k, v in model.state_dict().items() if ".tuned_" not in k}
