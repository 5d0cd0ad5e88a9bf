"""Checkpoint I/O in the hub layout (config.json + single or sharded safetensors with an index).

On disk, routed experts are per-expert Linear weights (`...mlp.experts.{j}.gate_proj.weight`);
in memory they are stacked (`...mlp.experts.gate_up_proj` [E, 2I, H], `...down_proj` [E, H, I]).
Loading builds the model on the meta device, allocates it once on the target device and dtype,
then streams tensors one at a time from each shard into place, so no second full copy exists.
Saving writes into a temporary directory that is renamed over the target at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.models.config import load_config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model its config describes."""


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
    return files


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one safetensors file, one tensor in memory at a time."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{file}: cannot read safetensors data ({err}); truncated or corrupt?") from err


class _Loader:
    """Copies hub-layout tensors into a materialised model, checking names and shapes."""

    def __init__(self, model: torch.nn.Module, skip: tuple[str, ...] = (), fresh: tuple[str, ...] = ()):
        self.state = dict(model.state_dict(keep_vars=True))
        self.config = model.config
        self.skip = set(skip)  # checkpoint keys read past on purpose (a causal LM's head under a score head)
        self.expected = {k for k in self.state if not self._tied(k) and k not in fresh}
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def _tied(self, key: str) -> bool:
        return key == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def _target(self, key: str) -> tuple[str, torch.Tensor] | None:
        match = EXPERT_KEY.match(key)
        if not match:
            return (key, self.state[key]) if key in self.state else None
        prefix, j, part = match.group(1), int(match.group(2)), match.group(3)
        stacked_name = f"{prefix}.down_proj" if part == "down_proj" else f"{prefix}.gate_up_proj"
        stacked = self.state.get(stacked_name)
        if stacked is None or j >= stacked.shape[0]:
            return None
        half = stacked.shape[1] // 2
        view = {"gate_proj": stacked[j, :half], "up_proj": stacked[j, half:], "down_proj": stacked[j]}[part]
        return f"{stacked_name}[{j}].{part}", view

    def _skippable(self, key: str) -> bool:
        layer = LAYER_KEY.match(key)
        beyond = layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers
        return beyond or bool(IGNORED.search(key)) or self._tied(key) or key in self.skip

    @torch.no_grad()
    def copy(self, key: str, tensor: torch.Tensor, file: Path) -> None:
        target = self._target(key)
        if target is None:
            if not self._skippable(key):
                self.unexpected.append(key)
            return
        name, dest = target
        if tuple(dest.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {tuple(tensor.shape)}, the config needs {tuple(dest.shape)}"
            )
        dest.copy_(tensor, non_blocking=True)
        self.loaded.add(name)

    def missing(self) -> list[str]:
        need = set()
        for key in self.expected:
            if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
                parts = ("down_proj",) if key.endswith("down_proj") else ("gate_proj", "up_proj")
                need |= {f"{key}[{j}].{p}" for j in range(self.state[key].shape[0]) for p in parts}
            else:
                need.add(key)
        return sorted(need - self.loaded)


def resolve_device(device_map) -> torch.device:
    """A single target device from a device/str/int or a {"": device} map; "auto" = cuda:0 if any."""
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map {device_map!r}: only a single device ({{'': device}}) is supported")
        device_map = device_map[""]
    if device_map in (None, "auto"):
        return torch.device("cuda:0" if device_map == "auto" and torch.cuda.is_available() else "cpu")
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


def resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def empty_model(cls, config, dtype: torch.dtype, device: torch.device):
    """Allocate `cls(config)` once on device/dtype, uninitialised."""
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(cls, path: str | os.PathLike, dtype=None, device_map=None, skip: tuple[str, ...] = (),
               fresh: tuple[str, ...] = (), **config_overrides):
    """Read a hub-layout checkpoint directory into `cls`, streamed to the target device and dtype.
    skip: checkpoint keys not to load; fresh: model keys the checkpoint need not hold (left uninitialised
    for the caller); config_overrides: set on the config before the model is built (e.g. num_labels)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a local checkpoint directory)")
    config = load_config(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    files = shard_files(path)
    model = empty_model(cls, config, resolve_dtype(dtype, config), resolve_device(device_map))
    loader = _Loader(model, skip, fresh)
    for file in files:
        for key, tensor in read_tensors(file):
            loader.copy(key, tensor, file)
    if loader.unexpected:
        raise CheckpointError(f"{path}: tensors the config does not describe: {loader.unexpected[:8]}")
    missing = loader.missing()
    if missing:
        raise CheckpointError(f"{path}: missing tensors (e.g. truncated index or wrong config): {missing[:8]}")
    return model.eval()


def hub_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict in the hub layout: stacked experts split into per-expert Linear weights."""
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix, half = key[: -len(".gate_up_proj")], value.shape[1] // 2
            for j in range(value.shape[0]):
                yield f"{prefix}.{j}.gate_proj.weight", value[j, :half]
                yield f"{prefix}.{j}.up_proj.weight", value[j, half:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for j in range(value.shape[0]):
                yield f"{prefix}.{j}.down_proj.weight", value[j]
        else:
            yield key, value


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> None:
    shards: list[tuple[Path, list[str]]] = []
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            file = out / f"shard-{len(shards):05d}.tmp"
            save_file(batch, str(file), metadata={"format": "pt"})
            shards.append((file, list(batch)))
        batch, size = {}, 0

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > max_bytes:
            flush()
        batch[key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    flush()
    if len(shards) == 1:
        shards[0][0].rename(out / SINGLE)
        return
    weight_map = {}
    for i, (file, keys) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        file.rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '500MB'")
    return int(float(match.group(1)) * units[match.group(2)])


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory onto `out`, replacing any previous content."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def save_model(model, out: str | os.PathLike, state_dict=None, max_shard_size: int | str = "5GB") -> None:
    """Write config.json + safetensors (hub layout) atomically: temp dir, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = dict(state_dict if state_dict is not None else model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        model.config.dtype = next(iter(state.values())).dtype
        model.config.save_pretrained(tmp)
        _write_shards(hub_tensors(state), tmp, parse_size(max_shard_size))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
