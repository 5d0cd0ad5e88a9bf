"""What a forward keeps for backward, in bytes: how train.gradient_checkpointing modes are measured
(bench/activation_memory.py, tests/train/test_activation_checkpointing.py).

`retained_bytes(fn, *args)` counts the storages that fn's ops create and that are still alive when it
returns (its result left out): whatever backward will read, however it is held. saved_tensors_hooks
alone cannot compare the modes: inside a checkpoint, the checkpoint's own hooks replace outer ones,
and selective checkpointing keeps the saved ops' outputs in its own cache, not through the hooks.
`saved_bytes(fn, *args)` is that hook count (distinct storages autograd saves, leaving out those of
`exclude`: parameters, inputs), what `retained_bytes` must equal without checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Births(TorchDispatchMode):
    """Records a weak reference and the size of every storage an op creates (an output storage that none
    of its inputs shares: views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _storage_keys((args, kwargs))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                known = self.storages.get(ref.cdata)
                if ref.cdata not in inputs and (known is None or known[0].expired()):  # addresses are reused
                    self.storages[ref.cdata] = (ref, storage.nbytes())
        return out


def _storage_keys(tensors) -> set[int]:
    leaves = tree_leaves(tensors)
    return {t.untyped_storage()._cdata for t in leaves if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def retained_bytes(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """(bytes of the storages created by fn(*args, **kwargs) still alive after it returns, its result)."""
    with _Births() as births:
        out = fn(*args, **kwargs)
    own = _storage_keys(out)
    alive = sum(size for key, (ref, size) in births.storages.items() if key not in own and not ref.expired())
    return alive, out


def saved_bytes(fn: Callable, *args, exclude: Iterable = (), **kwargs) -> tuple[int, object]:
    """(bytes of the distinct storages autograd saves for backward during fn, those of `exclude`
    left out; the result). Saved tensors of a checkpointed region are the checkpoint's, not counted."""
    skip, seen = _storage_keys(list(exclude)), {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out
