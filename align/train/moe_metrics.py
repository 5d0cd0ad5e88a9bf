"""What a GRPO update measures about MoE routing, from the forwards of its first optimizer step
(weights still those that generated the rollout):

- `policy/logprob_mismatch`: mean |engine log-prob − training log-prob| over the generated tokens;
- `moe/routing_agreement`: the share of the engine's token-layer expert choices that the training
  forward's gates pick by themselves (|own ∩ engine| / k, averaged over every token and MoE layer the
  engine routed); 1 = the two networks are the same network;
- router health, per MoE layer from the experts the training forward used on the real tokens:
  `moe/load_max_over_mean/layer_<i>` (tokens of the busiest expert / mean tokens per expert; 1 = even)
  and `moe/load_entropy/layer_<i>` (entropy of the load over experts / log E; 1 = even), summarised as
  `moe/load_max_over_mean` (the worst layer, max) and `moe/load_entropy` (the worst layer, min).

Sums stay on the device until `summary()`, one host read per update.
"""

from __future__ import annotations

import math

import torch

from align.models.config import moe_layers
from align.models.moe import expert_hits
from align.train.rollout_batch import PolicyPass, RolloutBatch


class MoEMetrics:
    """Accumulates the metrics above over the micro-batches of one optimizer step."""

    def __init__(self, config):
        self.layers, self.n_experts = moe_layers(config), config.n_routed_experts or 0
        self.sums: dict[str, torch.Tensor] = {}
        self.load: dict[int, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add(self, out: PolicyPass, batch: RolloutBatch) -> None:
        """One micro-batch's pass (run with observe=True for the routing metrics)."""
        mask = batch.token_mask
        if batch.sample_logps is not None:
            self._add("mismatch", torch.stack([((out.logps.detach() - batch.sample_logps).abs() * mask).sum(),
                                               mask.sum()]))
        if out.trace is None or not self.layers:
            return
        real = batch.real_tokens().reshape(-1)
        for m, layer in enumerate(self.layers):
            routing = out.trace.layers[layer]
            load = routing.load(self.n_experts, real)
            self.load[layer] = self.load[layer] + load if layer in self.load else load
            if batch.routing is not None and layer in out.trace.own:
                self._add("agreement", self._agreement(batch.routing[:, :, m], out.trace.own[layer], real))

    def _agreement(self, engine: torch.Tensor, own: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[shared choices, engine choices] over the real positions the engine routed."""
        engine = engine.reshape(own.shape).long()
        routed = (engine[:, 0] >= 0) & real.bool()  # [T]
        hits = expert_hits(engine.clamp(min=0), self.n_experts)  # [T, E]
        shared = hits.gather(1, own).sum(-1)  # [T]: engine choices the gate also picks
        return torch.stack([(shared * routed).sum(), routed.sum() * engine.shape[1]]).float()

    def summary(self, gather=list) -> dict[str, float]:
        """The metrics; gather (align.train.data_parallel.gatherer): over every process's micro-batches."""
        out: dict[str, float] = {}
        sums = _added(gather([{k: v.tolist() for k, v in self.sums.items()}]))
        loads = _added(gather([{layer: load.tolist() for layer, load in self.load.items()}]))
        if "mismatch" in sums:
            out["policy/logprob_mismatch"] = sums["mismatch"][0] / max(sums["mismatch"][1], 1.0)
        if sums.get("agreement", [0, 0])[1]:
            out["moe/routing_agreement"] = sums["agreement"][0] / sums["agreement"][1]
        if loads:
            out.update(load_metrics(loads))
        return out


def _added(parts: list[dict]) -> dict:
    """Dicts of equal-length number lists (one per process) -> one dict, the lists added elementwise."""
    return {k: [sum(values) for values in zip(*(p[k] for p in parts), strict=True)] for k in parts[0]}


def load_metrics(loads: dict[int, list[int]]) -> dict[str, float]:
    """Per layer: busiest expert / mean, and normalised entropy of the load; then the worst layer of each."""
    out: dict[str, float] = {}
    for layer, load in loads.items():
        total, n = sum(load), len(load)
        if not total or n < 2:
            continue
        shares = [c / total for c in load if c]
        out[f"moe/load_max_over_mean/layer_{layer}"] = max(load) * n / total
        out[f"moe/load_entropy/layer_{layer}"] = -sum(p * math.log(p) for p in shares) / math.log(n)
    peaks = [v for k, v in out.items() if k.startswith("moe/load_max_over_mean/")]
    entropies = [v for k, v in out.items() if k.startswith("moe/load_entropy/")]
    if peaks:
        out["moe/load_max_over_mean"], out["moe/load_entropy"] = max(peaks), min(entropies)
    return out
