"""Where the decode step's time goes at DeepSeek-V2-Lite shape (random bf16 weights).

python bench/profile_decode.py [--batch 64] [--attend 384] [--variants]

Prints: the kernel table of one eager step; the CUDA-graph step time; and each part of one layer
timed alone under a CUDA graph (attention, gate, routed experts, shared experts) with the bytes of
weights it reads and the bandwidth that implies.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from align.generation.cache import LatentCache
from align.generation.forward import decode_logits
from align.models import build_model


def graph_ms(fn, reps: int = 50, calls: int = 1) -> float:
    """Mean time of fn() replayed from a CUDA graph holding `calls` calls of it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / calls


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def layer_parts(model, cache, batch: int, attend: int) -> None:
    layer = model.model.layers[1]
    hidden = model.config.hidden_size
    x = torch.randn(batch, 1, hidden, device="cuda", dtype=torch.bfloat16)
    positions = torch.full((batch,), attend - 1, device="cuda")
    cos, sin = model.model.rotary_emb(positions[:, None])
    flat = x[:, 0]
    weights, experts, _ = layer.mlp.gate(flat)
    parts = {
        "attention": (lambda: layer.self_attn.decode(x, cos, sin, cache.layer(1), positions, attend),
                      nbytes(layer.self_attn)),
        "gate": (lambda: layer.mlp.gate(flat), nbytes(layer.mlp.gate)),
        "routed experts": (lambda: layer.mlp.experts(flat, weights, experts), nbytes(layer.mlp.experts)),
        "shared experts": (lambda: layer.mlp.shared_experts(x), nbytes(layer.mlp.shared_experts)),
        "whole layer": (lambda: layer.decode(x, None, cos, sin, cache.layer(1), positions, attend), nbytes(layer)),
    }
    hit = int(torch.unique(experts).numel())
    n_experts = layer.mlp.gate.n_experts
    print(f"\nparts of one MoE layer, batch {batch}, attend {attend} ({hit} of {n_experts} experts hit)")
    for name, (fn, size) in parts.items():
        with torch.no_grad():
            ms = graph_ms(fn)
        print(f"  {name:15s} {ms * 1e3:8.1f} us  weights {size / 2**20:7.1f} MiB  {size / ms / 1e6:7.0f} GB/s")


def expert_gemms(model, batch: int) -> None:
    """grouped_mm over routed rows vs one bmm over [E, capacity=batch] padded rows, same weights."""
    experts = model.model.layers[1].mlp.experts
    k = model.config.num_experts_per_tok
    n_exp = experts.gate_up_proj.shape[0]
    choice = torch.rand(batch, n_exp, device="cuda").topk(k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(choice, minlength=n_exp)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    print(f"\nexpert GEMMs, batch {batch} ({batch * k} routed rows)")
    for name, weight in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
        rows = torch.randn(batch * k, weight.shape[2], device="cuda", dtype=torch.bfloat16)
        padded = torch.randn(n_exp, batch, weight.shape[2], device="cuda", dtype=torch.bfloat16)
        size = weight.numel() * weight.element_size()
        with torch.no_grad():
            g = graph_ms(lambda r=rows, w=weight: torch._grouped_mm(r, w.transpose(-2, -1), offs=offsets))
            b = graph_ms(lambda p=padded, w=weight: torch.bmm(p, w.transpose(1, 2)))
        print(f"  {name:8s} grouped_mm {g * 1e3:7.1f} us ({size / g / 1e6:5.0f} GB/s)   "
              f"padded bmm {b * 1e3:7.1f} us ({size / b / 1e6:5.0f} GB/s)")


def variants(model, cache, tokens, positions, attend: int) -> None:
    """Graph step time of the decode step run eagerly and under torch.compile variants."""
    import align.kernels.mla_decode as mla_decode
    import align.kernels.moe_experts as moe  # where the expert path calls grouped_linear

    mla_decode._bmm_out_dtype_works = lambda device, dtype: True  # the probe is not traceable
    step = lambda fn: graph_ms(lambda: fn(model, cache, tokens, positions, attend), reps=20)  # noqa: E731
    with torch.no_grad():
        print("\nvariants (CUDA-graph step time)")
        print(f"  eager                          {step(decode_logits):.2f} ms")
        eager_grouped = moe.grouped_linear
        moe.grouped_linear = torch.compiler.disable(eager_grouped)
        print(f"  compile, grouped_mm eager      {step(torch.compile(decode_logits, dynamic=False)):.2f} ms")
        moe.grouped_linear = eager_grouped
        torch._dynamo.reset()
        print(f"  compile, all                   {step(torch.compile(decode_logits, dynamic=False)):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--attend", type=int, default=384)
    parser.add_argument("--variants", action="store_true", help="also time torch.compile variants (minutes)")
    args = parser.parse_args()
    model = build_model("deepseek-v2-lite", dtype=torch.bfloat16, device_map="cuda").eval()
    cache = LatentCache.for_model(model.config, args.batch, args.attend, torch.bfloat16, "cuda")
    tokens = torch.randint(0, model.config.vocab_size, (args.batch,), device="cuda")
    positions = torch.full((args.batch,), args.attend // 2, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            decode_logits(model, cache, tokens, positions, args.attend)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode_logits(model, cache, tokens, positions, args.attend)
            torch.cuda.synchronize()
        step = graph_ms(lambda: decode_logits(model, cache, tokens, positions, args.attend), reps=20)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    print(f"decode step under a CUDA graph: {step:.2f} ms; weights {nbytes(model) / 2**30:.2f} GiB")
    layer_parts(model, cache, args.batch, args.attend)
    for batch in (16, 64, 256):
        expert_gemms(model, batch)
    if args.variants:
        variants(model, cache, tokens, positions, args.attend)


if __name__ == "__main__":
    main()
