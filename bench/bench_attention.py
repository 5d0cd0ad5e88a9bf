"""MLA training attention at DeepSeek-V2-Lite's head sizes: the kernels align's training forward can use,
forward and forward + backward, causal, one document per row (issue 14's long rows are attention-bound).

python bench/bench_attention.py --out attention.json                 # GPU: 16 heads, q/k 192, v 128, bf16
python bench/bench_attention.py --lengths 4096 32768 131072 --out ...
python bench/bench_attention.py --smoke --out /tmp/attention.json    # CPU: tiny shapes, math path only

Candidates, each on the same q [1, h, L, 192], k [1, h, L, 192], v [1, h, L, 128]:
- `product`: align.models.mla.sdpa without a mask, what a row of one document runs (on Hopper cuDNN's kernel
  with v at 128, align.kernels.causal_attention; elsewhere SDPA's choice with v zero-padded to 192);
- `varlen`: align.kernels.varlen_attention on the row as one segment (packed rows' path: FlashAttention-2,
  v padded);
- `sdpa_<backend>`: torch's SDPA restricted to one backend (flash with v padded; efficient and cuDNN with v
  at 128, which they take), i.e. what transformers' sdpa path may pick.
A candidate that the backend refuses is reported with its error. Time: median of --repeats CUDA-event
timings after --warmup; TFLOP/s from causal FLOPs 2 * h * (192 + 128) * L(L+1)/2 forward, x3.5 forward +
backward (the useful head sizes: padding is not counted, so padding shows as lost speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, QK, V = 16, 192, 128


def candidates(smoke: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from align.kernels.varlen_attention import varlen_attention
    from align.models.mla import sdpa

    scale = QK**-0.5

    def product(q, k, v):
        return sdpa(q, k, v, None, scale)

    def varlen(q, k, v):
        length = q.shape[2]
        cu = torch.tensor([0, length], dtype=torch.int32, device=q.device)
        flat = [t[0].transpose(0, 1) for t in (q, k, v)]  # [L, h, d] each
        return varlen_attention(*flat, cu, length, scale).transpose(0, 1)[None]  # [1, h, L, v]

    def restricted(backend, pad: bool):
        def run(q, k, v):
            vv = F.pad(v, (0, QK - V)) if pad else v
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
            return out[..., :V]
        return run

    if smoke:
        return {"product": product, "sdpa_math": restricted(SDPBackend.MATH, False)}
    return {"product": product, "varlen": varlen,
            "sdpa_flash": restricted(SDPBackend.FLASH_ATTENTION, True),
            "sdpa_efficient": restricted(SDPBackend.EFFICIENT_ATTENTION, False),
            "sdpa_cudnn": restricted(SDPBackend.CUDNN_ATTENTION, False)}


def timed(fn, warmup: int, repeats: int, device: str) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(fn, length: int, args) -> dict:
    """Forward and forward + backward of fn at one length: seconds, TFLOP/s, and the error against the
    float32 math reference at the first 512 queries (the reference of the whole row is too large)."""
    gen = torch.Generator(device=args.device).manual_seed(length)
    q, k = (torch.randn(1, HEADS, length, QK, device=args.device, generator=gen, dtype=args.dtype) for _ in range(2))
    v = torch.randn(1, HEADS, length, V, device=args.device, generator=gen, dtype=args.dtype)
    grad = torch.randn(1, HEADS, length, V, device=args.device, generator=gen, dtype=args.dtype)
    flops = 2 * HEADS * (QK + V) * length * (length + 1) / 2
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def backward():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    with torch.no_grad():
        out = fn(q, k, v)
        n = min(length, 512)
        ref = F.scaled_dot_product_attention(q[:, :, :n].float(), k[:, :, :n].float(), v[:, :, :n].float(),
                                             is_causal=True, scale=QK**-0.5)
        error = ((out[:, :, :n].float() - ref).abs().max() / ref.abs().max()).item()
        forward_s = timed(lambda: fn(q, k, v), args.warmup, args.repeats, args.device)
    both_s = timed(backward, args.warmup, args.repeats, args.device)
    return {"forward_s": forward_s, "forward_tflops": flops / forward_s / 1e12,
            "forward_backward_s": both_s, "forward_backward_tflops": 3.5 * flops / both_s / 1e12,
            "max_rel_error_first_512": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, short rows, math path")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="row lengths (default 4096 32768)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    args.lengths = args.lengths or ([64, 128] if args.smoke else [4096, 32768])
    if args.smoke:
        args.warmup, args.repeats = 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    result = {"machine": machine, "torch": torch.__version__, "heads": HEADS, "qk_head_dim": QK, "v_head_dim": V,
              "dtype": str(args.dtype), "lengths": {}}
    for length in args.lengths:
        rows = {}
        for name, fn in candidates(args.smoke).items():
            try:
                rows[name] = measure(fn, length, args)
            except RuntimeError as error:  # a backend that refuses these shapes is a result too
                rows[name] = {"error": str(error).splitlines()[0][:200]}
            if args.device == "cuda":
                torch.cuda.empty_cache()
            print(length, name, json.dumps(rows[name]), flush=True)
        result["lengths"][str(length)] = rows
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
