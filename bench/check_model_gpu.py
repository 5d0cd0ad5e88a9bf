"""GPU checks of the model core: grouped-GEMM experts against the reference path, V2-Lite shape.

python bench/check_model_gpu.py --out results.json

1. Experts at V2-Lite shape (H 2048, I 1408, 64 experts, top-6), bf16: torch._grouped_mm path vs
   the padded-bmm reference, forward and backward (relative error), and their times.
2. The whole deepseek-v2-lite preset, random bf16 weights on one GPU: build time, memory, and a
   forward+backward of 1 x 2048 tokens with gradients for the attention weights only (no LoRA,
   no checkpointing; a smoke test, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from align.kernels.grouped_mm import grouped_linear, grouped_linear_reference
from align.models import build_model, preset_config
from align.models.moe import Experts, Gate


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check_experts(tokens: int = 8192) -> dict:
    config = preset_config("deepseek-v2-lite")
    torch.manual_seed(0)
    gate = Gate(config).cuda()
    experts = Experts(config).cuda().to(torch.bfloat16)
    for p in (gate.weight, experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        weights, idx, _ = gate(x)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.cumsum(torch.bincount(flat, minlength=config.n_routed_experts), 0, dtype=torch.int32)  # ends
    xs = x[order // idx.shape[1]].detach().requires_grad_()
    w = experts.gate_up_proj
    fast = grouped_linear(xs, w, counts)
    ref = grouped_linear_reference(xs, w, counts)
    grad = torch.randn_like(fast)
    gx_fast, gw_fast = torch.autograd.grad(fast, (xs, w), grad)
    gx_ref, gw_ref = torch.autograd.grad(ref, (xs, w), grad)
    exact = grouped_linear_reference(xs.double(), w.double(), counts)
    return {
        "tokens": tokens,
        "fwd_rel_err_fast_vs_fp64": rel(fast, exact),
        "fwd_rel_err_ref_vs_fp64": rel(ref, exact),
        "dx_rel_err": rel(gx_fast, gx_ref),
        "dw_rel_err": rel(gw_fast, gw_ref),
        "fwd_ms_grouped_mm": timed(lambda: grouped_linear(xs, w, counts)),
        "fwd_ms_reference": timed(lambda: grouped_linear_reference(xs, w, counts)),
        "full_experts_fwd_bwd_ms": timed(lambda: experts(x, weights, idx).float().sum().backward()),
    }


def check_full_model(seq: int = 2048) -> dict:
    start = time.perf_counter()
    model = build_model("deepseek-v2-lite", dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    model.train()
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn" in name)  # gradients for attention only: fits one GPU

    def step():
        model(ids, labels=ids).loss.backward()

    torch.cuda.reset_peak_memory_stats()
    ms = timed(step, reps=3)
    loss = model(ids, labels=ids).loss.item()
    return {
        "params_billion": params / 1e9, "build_s": built, "fwd_bwd_ms_1x2048": ms,
        "tokens_per_s_fwd_bwd": seq / ms * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_random_init": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="check_model_gpu.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["experts"] = check_experts()
    print(json.dumps(result, indent=2), flush=True)
    result["full_model"] = check_full_model()
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
