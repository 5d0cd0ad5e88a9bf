"""Bytes a decoder layer's forward keeps for backward, per token, under train.gradient_checkpointing
false / true / selective (align/train/activation_memory.py counts them).

python bench/activation_memory.py                         # CPU: V2-Lite layer shapes (2 layers), float32
python bench/activation_memory.py --device cuda --dtype bfloat16 --docs 2   # GPU: the Triton / flash paths
python bench/activation_memory.py --device cuda --dtype bfloat16 --breakdown  # + what each op keeps, frozen

Layers 0 (dense MLP) and 1 (MoE) of the preset, random weights (normal, std 0.02), one row of --tokens
tokens cut into --docs packed documents. `full`: every weight trains; `frozen`: weights frozen and the
input requiring grad, what the base model of a LoRA run keeps (the adapters' own few rank-r tensors
aside). true keeps the layer's input only, which is not created by the forward: it counts 0 here.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from align.models.layout import attention_layout
from align.models.model import DecoderLayer
from align.models.presets import preset_config
from align.models.rope import RotaryEmbedding
from align.train.activation_checkpointing import set_layer_forward
from align.train.activation_memory import retained_bytes

MODES = (False, True, "selective")


def build_layers(preset: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.ModuleList, object]:
    config = preset_config(preset, num_hidden_layers=2)
    with torch.device(device):
        layers = torch.nn.ModuleList(DecoderLayer(config, i) for i in range(2)).to(dtype)
        rotary = RotaryEmbedding(config)
    with torch.no_grad():
        for name, p in layers.named_parameters():
            p.fill_(1.0) if "layernorm" in name else p.normal_(0.0, 0.02)
    return layers.train(), rotary


def layer_inputs(layers, rotary, args, dtype: torch.dtype, frozen: bool):
    tokens, docs, device = args.tokens, args.docs, args.device
    hidden = layers[0].input_layernorm.weight.shape[0]
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=frozen)
    cuts = torch.linspace(0, tokens, docs + 1).long().tolist()
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:], strict=False)])[None].to(device)
    cos, sin = rotary(positions)
    return x, cos, sin, attention_layout(x, positions, None)


def measure(args) -> dict:
    dtype = getattr(torch, args.dtype)
    layers, rotary = build_layers(args.preset, args.device, dtype)
    table = {}
    for setting in ("full", "frozen"):
        layers.requires_grad_(setting == "full")
        x, cos, sin, mask = layer_inputs(layers, rotary, args, dtype, setting == "frozen")
        for mode in MODES:
            set_layer_forward(layers, mode)
            for index, layer in enumerate(layers):
                with torch.autocast(args.device, dtype, enabled=dtype != torch.float32 and args.device == "cuda"):
                    kept, out = retained_bytes(layer, x, cos, sin, mask)
                del out
                table[setting, index, mode] = kept / args.tokens
    return table


def _node_saved(node) -> list[torch.Tensor]:
    """The tensors an autograd node holds for backward (built-in nodes' `_saved_*`, custom Functions')."""
    found = []
    for name in [n for n in dir(node) if n.startswith("_saved_")] + ["saved_tensors"]:
        try:
            value = getattr(node, name)
        except (AttributeError, RuntimeError):
            continue
        found += [t for t in (value if isinstance(value, tuple | list) else [value]) if isinstance(t, torch.Tensor)]
    return found


def saved_by_node(root: torch.Tensor, exclude: list[torch.Tensor]) -> dict[str, int]:
    """Bytes of the distinct storages the graph behind root saves, by node kind, shape and dtype (storages of
    `exclude`: weights, the input, left out; a storage is counted at the first node found holding it)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    totals, stack, visited = defaultdict(int), [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for t in _node_saved(node):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                totals[f"{type(node).__name__} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"] += (
                    t.untyped_storage().nbytes())
        stack.extend(f for f, _ in node.next_functions)
    return dict(totals)


def breakdown(args) -> None:
    """What the frozen MoE layer (layer 1) keeps without checkpointing, by autograd node."""
    dtype = getattr(torch, args.dtype)
    layers, rotary = build_layers(args.preset, args.device, dtype)
    layers.requires_grad_(False)
    set_layer_forward(layers, False)
    x, cos, sin, mask = layer_inputs(layers, rotary, args, dtype, True)
    with torch.autocast(args.device, dtype, enabled=dtype != torch.float32 and args.device == "cuda"):
        out = layers[1](x, cos, sin, mask)[0]
    totals = saved_by_node(out, [x, *layers.parameters()])
    print(f"frozen MoE layer, mode false: {sum(totals.values()) / args.tokens / 1024:.1f} KiB per token kept")
    for name, size in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{size / args.tokens / 1024:10.2f} KiB/token  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--docs", type=int, default=1, help="packed documents in the row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--breakdown", action="store_true", help="also list what the frozen MoE layer keeps, by op")
    args = parser.parse_args()
    if args.breakdown:
        breakdown(args)
    table = measure(args)
    print(f"{args.preset}, {args.tokens} tokens, {args.docs} document(s), {args.device} {args.dtype}: KiB per token")
    print(f"{'weights':8} {'layer':10} " + " ".join(f"{str(m).lower():>10}" for m in MODES) + "  selective/false")
    for setting in ("full", "frozen"):
        for index, kind in enumerate(("0 dense", "1 MoE")):
            row = [table[setting, index, m] / 1024 for m in MODES]
            print(f"{setting:8} {kind:10} " + " ".join(f"{v:10.1f}" for v in row) + f"  {row[2] / row[0]:14.2f}")


if __name__ == "__main__":
    main()
