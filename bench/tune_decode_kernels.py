"""Time the Triton decode kernels at V2-Lite shape over their block sizes (GPU).

python bench/tune_decode_kernels.py [--batch 64 256] [--attend 384] [--only experts]
"""

from __future__ import annotations

import argparse

import torch
import triton
from profile_decode import graph_ms  # bench/ is on the path when this script runs

from align.kernels import moe_experts_triton, moe_route_triton
from align.kernels.mla_decode import _latent_attention_triton
from align.kernels.moe_experts import _expert_mlp_triton, expert_mlp_reference, sort_by_expert_reference


def graph_us(fn, reps: int = 100) -> float:
    """Mean time of fn() in microseconds, ten calls per replayed CUDA graph."""
    return graph_ms(fn, reps, calls=10) * 1e3


def tune_sort(batch: int, k: int = 6, n_experts: int = 64) -> None:
    experts = torch.rand(batch, n_experts, device="cuda").topk(k, dim=-1).indices.reshape(-1)
    n = experts.numel()
    source, position = (torch.empty(n, dtype=torch.long, device="cuda") for _ in range(2))
    ends = torch.empty(n_experts, dtype=torch.int32, device="cuda")
    ref = sort_by_expert_reference(experts.view(batch, k), n_experts)
    torch_us = graph_us(lambda: sort_by_expert_reference(experts.view(batch, k), n_experts))
    print(f"sort_by_expert, {n} slots: torch reference {torch_us:.1f} us")
    for block_n in (64, 128, 256, 512):
        for warps in (4, 8, 16):
            def run(bn=block_n, w=warps):
                moe_experts_triton.sort_kernel[(1,)](
                    experts, source, position, ends, n, k, n_experts, BLOCK_N=bn, BLOCK_E=64, num_warps=w
                )
            us = graph_us(run)
            ok = torch.equal(source, ref[0]) and torch.equal(position, ref[1].view(-1))
            print(f"  BLOCK_N {block_n:5d} warps {warps:2d}: {us:6.1f} us {'ok' if ok else 'WRONG'}")


def tune_gate(batch: int, hidden: int = 2048, n_experts: int = 64, k: int = 6) -> None:
    x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n_experts, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    weights = torch.empty(batch, k, device="cuda")
    experts = torch.empty(batch, k, dtype=torch.long, device="cuda")
    print(f"greedy_gate, {batch} tokens")
    for block_t in (16, 32):
        for block_h in (64, 128, 256):
            for warps in (4, 8):
                def run(bt=block_t, bh=block_h, w=warps):
                    moe_route_triton.greedy_gate_kernel[(triton.cdiv(batch, bt),)](
                        x, x.stride(0), weight, weight.stride(0), weights, experts, batch, hidden, n_experts, 1.0,
                        K=k, NORM=False, BLOCK_T=bt, BLOCK_E=64, BLOCK_H=bh, num_warps=w,
                    )
                try:
                    us = graph_us(run)
                except Exception as err:  # out of shared memory at large blocks
                    print(f"  BLOCK_T {block_t} BLOCK_H {block_h} warps {warps}: failed ({type(err).__name__})")
                    continue
                print(f"  BLOCK_T {block_t} BLOCK_H {block_h} warps {warps}: {us:6.1f} us")


def tune_experts(batch: int, k: int = 6, n_experts: int = 64, hidden: int = 2048, inter: int = 1408) -> None:
    """expert_mlp tile sizes vs the grouped-GEMM path (gather, two grouped GEMMs, SwiGLU)."""
    dt = torch.bfloat16
    choice = torch.rand(batch, n_experts, device="cuda").topk(k, dim=-1).indices
    source, _, ends = sort_by_expert_reference(choice, n_experts)
    x = torch.randn(batch, hidden, device="cuda", dtype=dt)
    gate_up = torch.randn(n_experts, 2 * inter, hidden, device="cuda", dtype=dt) * 0.02
    down = torch.randn(n_experts, hidden, inter, device="cuda", dtype=dt) * 0.02
    size = (gate_up.numel() + down.numel()) * 2

    def grouped():
        return expert_mlp_reference(x, source, ends, gate_up, down)

    ref = grouped()
    base = graph_us(grouped)
    print(f"routed experts, batch {batch}: grouped GEMM path {base:.1f} us ({size / base / 1e3:.0f} GB/s)")
    for block_n in (32, 64, 128):
        for block_k in (64, 128, 256):
            for warps in (4, 8):
                for stages in (3, 4, 5):
                    cfg = {"block_n": block_n, "block_k": block_k, "num_warps": warps, "num_stages": stages}
                    try:
                        out = _expert_mlp_triton(x, source, ends, gate_up, down, **cfg)
                        us = graph_us(lambda c=cfg: _expert_mlp_triton(x, source, ends, gate_up, down, **c), reps=20)
                    except Exception as err:  # out of shared memory at large tiles
                        print(f"  {cfg}: failed ({type(err).__name__})")
                        continue
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    print(f"  {cfg}: {us:6.1f} us ({size / us / 1e3:5.0f} GB/s) rel err {err:.1e}")


def tune_attention(batch: int, attend: int, heads: int = 16, rank: int = 512, rope: int = 64) -> None:
    dt = torch.bfloat16
    q_latent = torch.randn(batch, heads, rank, device="cuda", dtype=dt)
    q_pe = torch.randn(batch, heads, rope, device="cuda", dtype=dt)
    rows = torch.randn(batch, attend, rank + rope, device="cuda", dtype=dt)
    cos, sin = torch.rand(batch, rope // 2, device="cuda"), torch.rand(batch, rope // 2, device="cuda")
    positions = torch.full((batch,), attend - 1, device="cuda")
    out = torch.empty_like(q_latent)
    size = rows.numel() * rows.element_size()
    print(f"latent_attention, batch {batch}, {attend} rows ({size / 2**20:.1f} MiB of cache)")
    for block_t in (16, 32, 64):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                def run(bt=block_t, w=warps, s=stages):
                    _latent_attention_triton(
                        q_latent, q_pe, cos, sin, rows, positions, 0.1, True, out=out,
                        block_t=bt, num_warps=w, num_stages=s,
                    )
                try:
                    us = graph_us(run)
                except Exception as err:  # out of shared memory at large blocks
                    print(f"  BLOCK_T {block_t:3d} warps {warps} stages {stages}: failed ({type(err).__name__})")
                    continue
                speed = size / us / 1e3
                print(f"  BLOCK_T {block_t:3d} warps {warps} stages {stages}: {us:6.1f} us ({speed:5.0f} GB/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="decode rows (one table each)")
    parser.add_argument("--attend", type=int, default=384)
    parser.add_argument("--only", nargs="+", choices=("experts", "sort", "gate", "attention"),
                        default=("experts", "sort", "gate", "attention"))
    args = parser.parse_args()
    tuners = {"experts": tune_experts, "sort": tune_sort, "gate": tune_gate,
              "attention": lambda batch: tune_attention(batch, args.attend)}
    for batch in args.batch:
        for name in args.only:
            tuners[name](batch)


if __name__ == "__main__":
    main()
