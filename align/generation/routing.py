"""Recording the experts each rollout token was routed to (for routing replay in training).

Per MoE layer, the engine's passes route every token it feeds: the prompt's first L-1 tokens in the
packed prefill (except in the last layer, whose output the prefill never computes), then, in the
decode step, the last prompt token and every generated token but the last (which is never fed back).
A `Completion.routing` holds them in position order, [L - 1 + count, moe_layers, k], one small integer
per choice (int8 up to 128 routed experts, else int16) and -1 where the engine computed no routing, so
a replaying forward (align.models.moe.Gate) lets those rows choose by themselves.

The decode step writes into one preallocated device buffer with `torch.where` on the running rows:
no host read, so recording stays inside a captured CUDA graph.
"""

from __future__ import annotations

import torch

from align.models.config import moe_layers
from align.models.moe import RoutingTrace


def routing_dtype(n_experts: int) -> torch.dtype:
    """The smallest signed integer type holding every expert id and -1."""
    return torch.int8 if n_experts <= 128 else torch.int16


class RoutingRecorder:
    """Routing buffers of one generate call: decode [moe_layers, slots, max_new, k], prompts by index."""

    def __init__(self, config, slots: int, max_new: int, device):
        self.layers = moe_layers(config)
        self.k, self.dtype = config.num_experts_per_tok, routing_dtype(config.n_routed_experts)
        shape = (len(self.layers), slots, max_new, self.k)
        self.decoded = torch.full(shape, -1, dtype=self.dtype, device=device)
        self.prompts: dict[int, torch.Tensor] = {}  # prompt index -> [L - 1, moe_layers, k]

    def stacked(self, trace: RoutingTrace, tokens: int, device) -> torch.Tensor:
        """The trace's experts [moe_layers, tokens, k] in the compact dtype, -1 for layers it lacks."""
        missing = torch.full((tokens, self.k), -1, dtype=self.dtype, device=device)
        return torch.stack([trace.layers[i].experts.to(self.dtype) if i in trace.layers else missing
                            for i in self.layers])

    def record_decode(self, trace: RoutingTrace, running: torch.Tensor, rows: torch.Tensor,
                      col: torch.Tensor) -> None:
        """Store the decode step's routing of each running slot at its column (device ops only)."""
        new = self.stacked(trace, rows.shape[0], rows.device)  # [M, B, k]
        old = self.decoded[:, rows, col]
        self.decoded[:, rows, col] = torch.where(running[None, :, None], new, old)

    def record_prefill(self, trace: RoutingTrace, prompts: list[int], lengths: list[int], device) -> None:
        """Split a packed prefill's routing by prompt (prompt indices and token counts, in pass order)."""
        packed = self.stacked(trace, sum(lengths), device)  # [M, S, k]
        for prompt, part in zip(prompts, packed.split(lengths, dim=1), strict=True):
            self.prompts[prompt] = part.transpose(0, 1)  # [L - 1, M, k]

    def completion(self, prompt: int, prompt_len: int, decoded: torch.Tensor, count: int) -> torch.Tensor:
        """One completion's routing [prompt_len - 1 + count, M, k]: the prompt's prefill, then the decode
        steps (decoded: this slot's [M, max_new, k])."""
        fed = self.prompts.get(prompt)
        if fed is None:  # a one-token prompt: nothing was prefilled
            fed = decoded.new_full((prompt_len - 1, len(self.layers), self.k), -1)
        return torch.cat([fed, decoded[:, :count].transpose(0, 1)])
