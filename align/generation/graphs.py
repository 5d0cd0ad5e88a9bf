"""CUDA-graph capture of the decode step, one graph per static key (attention length bucket,
sampling mode), sharing one memory pool.

The step reads and writes only long-lived device buffers (token, position, counters, outputs, the
latent cache, the noise buffer), so replaying the graph is the whole step: one launch instead of a
few hundred kernels. Warm-up runs before capture execute the step for real, so the small state
tensors are saved first and restored afterwards (cache rows the warm-up writes are rewritten with
the same values by the real step). If capture fails (e.g. an op that reads back to the host, such
as the padded MoE fallback on pre-Hopper GPUs), the runner warns once and stays eager.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Hashable

import torch
from torch import nn


def model_signature(model: nn.Module) -> tuple:
    """What a captured graph bakes in besides its buffers: the address of every parameter and
    buffer (moved or replaced tensors invalidate a graph) and each adapter layer's Python-side
    state (enabled, merged, active adapters, scaling), e.g. generating inside `disable_adapter()`."""
    addresses = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return addresses, ()
    adapters = tuple(
        (
            bool(m.disable_adapters), bool(m.merged), tuple(m.active_adapters),
            tuple(sorted(getattr(m, "scaling", {}).items())),
        )
        for m in model.modules()
        if isinstance(m, BaseTunerLayer)
    )
    return addresses, adapters


class GraphRunner:
    def __init__(self, enabled: bool, state: list[torch.Tensor], signature: Hashable = None):
        self.enabled = enabled
        self.state = state
        self.signature = signature
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run `step` (which must do the same thing for the same key), through a graph when enabled."""
        if not self.enabled:
            step()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(step)
            if graph is None:
                step()
                return
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        saved = [t.clone() for t in self.state]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            self._restore(saved)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        except Exception as err:  # capture errors surface as RuntimeError or torch.AcceleratorError
            try:
                torch.cuda.synchronize()
            except Exception:  # the failed capture may have been reported already; nothing to add
                pass
            self._restore(saved)
            self.enabled = False
            warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {err}", stacklevel=3)
            return None
        self._restore(saved)
        return graph

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for tensor, value in zip(self.state, saved, strict=True):
            tensor.copy_(value)
