"""A GRPO round over N processes (data parallel): which prompts of the step this process generates, the
round's values every process needs whole (gathered), and one process's failure stopping them all.

A step's `prompts_per_step` prompts (order.DataOrder) are cut into N contiguous spans; process r generates,
scores and trains span r, whose prompts keep their index in the step as the key of their sampling noise
(align.generation.sampling), so a completion does not depend on N. A prompt's group stays on one process,
so group advantages need no communication; what does (scale_rewards=batch, every logged statistic) is
gathered with `gather`, so N processes log what one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from accelerate import Accelerator

Gather = Callable[[list], list]


class ProcessFailed(RuntimeError):
    """Another process of the run failed; every process stops with its error."""


def step_span(prompts_per_step: int, accelerator: Accelerator) -> range:
    """Positions, in the step's prompt list, of this process's prompts."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if prompts_per_step % world:
        fits = sorted({m * world for m in (prompts_per_step // world, prompts_per_step // world + 1) if m})
        raise ValueError(
            f"grpo.prompts_per_step={prompts_per_step} (global) does not divide by the {world} processes; use a "
            f"multiple of {world} (e.g. {' or '.join(map(str, fits))})")
    per = prompts_per_step // world
    return range(rank * per, (rank + 1) * per)


def gatherer(accelerator: Accelerator) -> Gather:
    """values (a list, this process's) -> every process's lists concatenated in process order (itself
    with one process). A collective: every process calls it at the same point."""
    if accelerator.num_processes == 1:
        return list

    def gather(values: list) -> list:
        from accelerate.utils import gather_object

        return [v for part in gather_object([list(values)]) for v in part]

    return gather


@contextmanager
def shared_failure(accelerator: Accelerator, what: str) -> Iterator[None]:
    """Run a process-local part of a step (no collective inside); if it raises on any process, every
    process raises: the failing one its own error, the others ProcessFailed naming it, instead of
    waiting in the next collective for a process that is gone."""
    if accelerator.num_processes == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C reaches every process (torchrun forwards it)
        raise
    except BaseException as exc:  # noqa: BLE001 - shared with the other processes, then re-raised
        error = exc
    from accelerate.utils import gather_object

    said = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
    if failed:
        rank, message = failed[0]
        raise ProcessFailed(f"{what} failed on process {rank} of {len(said)}: {message}; every process stops")
