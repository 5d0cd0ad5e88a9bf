"""Bytes a decoder layer's forward keeps for backward, per token, under train.gradient_checkpointing
false / true / selective (align/train/activation_memory.py counts them).

python bench/activation_memory.py                         # CPU: V2-Lite layer shapes (2 layers), float32
python bench/activation_memory.py --device cuda --dtype bfloat16 --docs 2   # GPU: the Triton / flash paths

Layers 0 (dense MLP) and 1 (MoE) of the preset, random weights (normal, std 0.02), one row of --tokens
tokens cut into --docs packed documents. `full`: every weight trains; `frozen`: weights frozen and the
input requiring grad, what the base model of a LoRA run keeps (the adapters' own few rank-r tensors
aside). true keeps the layer's input only, which is not created by the forward: it counts 0 here.
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--docs", type=int, default=1, help="packed documents in the row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    table = measure(args)
    print(f"{args.preset}, {args.tokens} tokens, {args.docs} document(s), {args.device} {args.dtype}: KiB per token")
    print(f"{'weights':8} {'layer':10} " + " ".join(f"{str(m).lower():>10}" for m in MODES) + "  selective/false")
    for setting in ("full", "frozen"):
        for index, kind in enumerate(("0 dense", "1 MoE")):
            row = [table[setting, index, m] / 1024 for m in MODES]
            print(f"{setting:8} {kind:10} " + " ".join(f"{v:10.1f}" for v in row) + f"  {row[2] / row[0]:14.2f}")


if __name__ == "__main__":
    main()
