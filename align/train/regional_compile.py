"""`train.compile`: torch.compile of the hot step only, each decoder layer's training forward (regional
compilation), never the whole model: every layer of one kind (dense / MoE) shares one compiled graph, so
compile time is a layer's, not the model's, and the embedding, head and loss stay eager.

What is compiled is align/train/activation_checkpointing.py's `run_layer`. Where the checkpoint sits:
- `selective`: inside the compiled region, so SAC becomes the compiler's recompute plan instead of a
  dispatch mode (torch.compile skips frames run under a dispatch mode, which eager SAC is);
- `true`: outside it, an eager non-reentrant checkpoint around the compiled layer (the graph of mode
  false): the layer input is all it keeps, as in eager. Compiled inside, the partitioner kept more
  (59.6 vs 45.3 GiB peak for `align sft` on V2-Lite, bench/BENCHMARKS.md).

Shapes: `dynamic=None`, PyTorch's automatic dynamic shapes. The first call compiles for its shapes; the
first call with another length recompiles once with the sequence length (and the other sizes that
changed: packed segments, max_len) symbolic, and later lengths reuse that graph. Packed rows differ
in length every step, so static shapes would recompile for each one (until the recompile limit, then
run eager); shape buckets would pad every row for a gain a symbolic length already gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

Compile = Literal["auto", True, False]
# what `auto` means on CUDA per loop, from GPU measurements (H200, V2-Lite, LoRA; bench/BENCHMARKS.md):
# sft: the step bench/bench_sft.py times, 22,789 vs 19,556 tokens/s with checkpointing (27,388 vs 23,651
# without); rl: bench_grpo.py's update, 4.29 vs 5.05 s with checkpointing in one lease (its first step
# pays ~8 s of compiling); rm: not measured, off
AUTO_ON_CUDA = {"sft": True, "rl": True, "rm": False}


def compile_enabled(setting: Compile, device: torch.device | str, loop: str = "sft") -> bool:
    """Whether train.compile is on for this device and loop (sft | rl | rm). true / false as set; `auto`:
    on CUDA where a measurement showed it pays (AUTO_ON_CUDA), always off on CPU (the tiny default and
    CI run eager)."""
    if setting not in ("auto", True, False):
        raise ValueError(f"train.compile: expected one of 'auto', true, false, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda" and AUTO_ON_CUDA[loop]
    return bool(setting)


def compile_layer_runner(runner: Callable, backend: str = "inductor") -> Callable:
    """The layer runner (run_layer) compiled: one dynamo cache for all layers, shapes automatic-dynamic;
    full checkpointing wraps the compiled layer from outside. backend: torch.compile's (tests take
    "aot_eager": the same graphs without inductor's C++ build)."""
    compiled = torch.compile(runner, dynamic=None, backend=backend)

    def run(layer: torch.nn.Module, mode, *args, **kwargs):
        if mode is True:
            return checkpoint(compiled, layer, False, *args, use_reentrant=False, **kwargs)
        return compiled(layer, mode, *args, **kwargs)

    return run
