"""`train.micro_batch_size: auto` (align sft): the largest micro-batch that fits, the step's rows unchanged.

The recipe fixes the rows of an optimizer step (`train.batch_size`, all processes); auto only chooses how
each process splits its share: micro-batch m among the divisors of the share, largest first, and
grad_accum = share / m. Which rows a step trains on and its loss normalisation do not depend on m, so
neither does the update (up to summation order).

On CUDA each candidate is tried before training: a forward and backward of m copies of the longest
training row (the step's worst case), gradients not synchronised (DDP `no_sync`), with the bytes the
optimizer's state will take held aside (its first step allocates them). A CUDA out-of-memory error, or
a peak above HEADROOM of the device's memory (room for the allocator's fragmentation), rejects it. The
processes take the smallest pick (all-reduce MIN). The RNG streams are restored afterwards, so the run
trains as if no probe ran. On the CPU there is no device memory to probe: auto takes each process's
whole share in one micro-batch. FSDP is refused: its forward runs collectives, and an out-of-memory error
on one process inside one would leave the others waiting.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from align.recipe import RecipeError

HEADROOM = 0.9  # of the device's memory, the most a probed step may peak at


def rows_per_step(train, processes: int) -> int:
    """Rows of one optimizer step over all processes: train.batch_size with micro_batch_size auto, else
    micro_batch_size x grad_accum x processes."""
    if train.micro_batch_size == "auto":
        if train.batch_size % processes:
            raise RecipeError(f"train.batch_size {train.batch_size} does not split over {processes} processes: "
                              f"make it a multiple of {processes}")
        return train.batch_size
    return train.micro_batch_size * train.grad_accum * processes


def candidates(share: int) -> list[int]:
    """Micro-batch sizes that split a process's share of a step evenly, largest first."""
    return [m for m in range(share, 0, -1) if share % m == 0]


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first size (they come largest first) that `fits`, or None."""
    return next((m for m in sizes if fits(m)), None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What AdamW's first step will allocate: two moments per trainable parameter without state yet."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    return sum(2 * p.numel() * p.element_size() for p in params if not optimizer.state.get(p))


def probe(setup, row: dict, collate: Callable, loss_fn: Callable, device: torch.device) -> Callable[[int], bool]:
    """fits(m): whether a forward and backward of m copies of `row` stay under HEADROOM on `device`."""
    limit = HEADROOM * torch.cuda.get_device_properties(device).total_memory
    reserve = optimizer_state_bytes(setup.optimizer)

    def fits(m: int) -> bool:
        held = None
        try:
            held = torch.empty(reserve, dtype=torch.uint8, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            batch = {k: v.to(device) for k, v in collate([row] * m).items()}
            with setup.grad_sync(False), setup.accelerator.autocast():
                ce, aux = loss_fn(setup.model, batch, 1, setup.head)
            setup.accelerator.backward(ce + aux)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) <= limit
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del held
            setup.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    return fits


def choose_micro_batch(setup, data, train, loss_fn: Callable, say: Callable[[str], None]) -> int:
    """This run's micro_batch_size: as the recipe says, or picked as the module says (grad_accum follows
    from rows_per_step)."""
    accelerator = setup.accelerator
    if train.micro_batch_size != "auto":
        return train.micro_batch_size
    share = rows_per_step(train, accelerator.num_processes) // accelerator.num_processes
    device = accelerator.device
    if device.type != "cuda":
        say(f"micro_batch_size auto: {share} rows per forward (no device memory to probe on {device.type})")
        return share
    if setup.sharded:
        raise RecipeError("train.micro_batch_size: auto cannot probe under FSDP (an out-of-memory error inside its "
                          "collectives would stall the other processes); set an integer micro_batch_size")
    longest = max(range(len(data.train)), key=data.tokens.__getitem__)
    with torch.random.fork_rng(devices=[device]):
        pick = largest_fitting(candidates(share), probe(setup, data.train[longest], data.collate, loss_fn, device))
    torch.cuda.reset_peak_memory_stats(device)  # train/peak_gib reports training, not the probe's candidates
    agreed = torch.tensor(pick or 0, device=device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    if not agreed.item():
        raise RecipeError(f"train.micro_batch_size: auto: not even one row of {data.tokens[longest]} tokens trains "
                          f"within {HEADROOM:.0%} of the GPU's memory; shorten data.max_length or turn on "
                          "train.gradient_checkpointing")
    micro = int(agreed.item())
    say(f"micro_batch_size auto: {micro} rows per forward x grad_accum {share // micro} (probed on {device})")
    return micro
