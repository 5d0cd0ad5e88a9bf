"""LoRA SFT step throughput at DeepSeek-V2-Lite shape: align's model vs transformers + peft, same run.

python bench/bench_sft.py --out sft.json [--batch 4 --seq 2048 --steps 5] [--smoke]

Random bf16 weights, LoRA r 16 (alpha 32) on align's default targets, through the product's LoRA path
(align.train.lora: the attention projections, gate/up/down_proj of dense layers and shared experts; routed
experts frozen), the same adapters on both models, gradient checkpointing, AdamW on the adapters,
labels = inputs (full causal-LM loss).
Reports tokens/s (median step) and peak memory for each implementation.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from align.models import build_model, preset_config
from align.train.lora import apply_lora, lora_config


def transformers_model(preset: str, device: str, **overrides):
    from transformers import DeepseekV2ForCausalLM as Reference

    config = preset_config(preset, **overrides)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Reference._from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return model


def lora_wrap(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, lora_config(model, r=16, alpha=32.0))


def time_steps(model, batch: int, seq: int, steps: int, device: str, **forward_kwargs) -> dict:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps + 2):
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, **forward_kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"tokens_per_s": batch * seq / median, "step_s": median, "peak_gib": peak,
            "trainable_params": sum(p.numel() for p in params), "losses": losses}


def profile(model, args) -> None:
    """Print the top CUDA kernels of one training step (align only, with --profile)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    model(input_ids=ids, labels=ids, return_logits=False).loss.backward()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        model(input_ids=ids, labels=ids, return_logits=False).loss.backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    for event in prof.key_averages(group_by_stack_n=4):
        if event.key in ("aten::baddbmm", "aten::copy_", "aten::mul") and event.device_time_total > 5e3:
            print(event.key, f"{event.device_time_total / 1e3:.1f} ms", event.count, " <- ".join(event.stack[:4]))


def compile_layers(model) -> None:
    """torch.compile each decoder layer (the hot step); checkpointing stays outside the compiled code."""
    for layer in model.base_model.model.model.layers:
        layer.compile(dynamic=False)


def run(name: str, build, args) -> dict:
    model = lora_wrap(build())
    if args.compile and name == "align":
        compile_layers(model)
    if args.profile and name == "align":
        profile(model, args)
    fused = {"return_logits": False} if name == "align" else {}  # align: fused linear cross-entropy
    result = time_steps(model, args.batch, args.seq, args.steps, args.device, **fused)
    print(name, json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_sft.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of one align step")
    parser.add_argument("--only-align", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile align's decoder layers")
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    preset = "tiny" if args.smoke else "deepseek-v2-lite"
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 64, 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "preset": preset, "compile": args.compile, "batch": args.batch, "seq": args.seq,
              "torch": torch.__version__}
    result["align"] = run("align", lambda: build_model(preset, dtype=dtype, device_map=args.device), args)
    if args.only_align:
        print(json.dumps(result["align"]))
        return
    result["transformers"] = run("transformers", lambda: transformers_model(preset, args.device), args)
    result["speedup"] = result["align"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    print(json.dumps({k: v for k, v in result.items() if k not in ("align", "transformers")}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
