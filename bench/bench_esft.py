"""ESFT peak memory and step time against LoRA (DeepSeek-V2-Lite shape) and full fine-tuning (a 4-layer
V2-Lite slice: full FT of the whole model does not fit one GPU), through the product's own pieces.

python bench/bench_esft.py --out esft.json [--seq 4096 --steps 3 --top-p 0.07] [--smoke]

Each mode is set up as `align sft` sets it up (align.train.setup's FullSetup / LoRASetup / ESFTSetup, the
optimizer of align.train.optim, bf16 weights, gradient checkpointing) and timed with the step `align sft`
runs (align.train.sft.train_step), one packed row of `--seq` random tokens per step. ESFT runs its real
scoring pass (align.train.esft) over `--score-tokens` random tokens. With random weights the router
spreads tokens nearly evenly, so the published top_p 0.2 (which keeps 5-9% of V2-Lite's trained experts)
would keep ~20% here; the default --top-p 0.07 keeps ~5 of 64 experts per layer, the published share.
Reports, per mode: trainable parameters, experts chosen, peak GPU memory over the steps (weights,
gradients, AdamW state, activations) and the median step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from align.models.config import moe_layers
from align.recipe import SFTRecipe, load_recipe
from align.train import esft
from align.train.lora import apply_lora, lora_config
from align.train.optim import build_optimizer, build_scheduler
from align.train.run import make_accelerator
from align.train.setup import ESFTSetup, FullSetup, LoRASetup, load_base_model, loss_head
from align.train.sft import train_step
from data_tools.packing import pad_batch


@dataclass
class RandomTask:
    """Training rows of random tokens, in the shape sft.SFTData hands to the ESFT scoring pass."""

    train: list[dict]
    tokens: list[int] = field(default_factory=list)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, pad_id=0)


def random_rows(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, vocab, (seq,), generator=gen).tolist() for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def bench_recipe(args, layers: int | None) -> SFTRecipe:
    overrides = [f"model.preset={args.preset}", f"model.dtype={args.dtype}", "train.steps=1", "data.synthetic.train=1",
                 "train.gradient_checkpointing=true", "output.run_dir=/tmp/bench_esft", "output.progress=false"]
    if layers is not None:
        overrides.append(f"model.config.num_hidden_layers={layers}")
    return load_recipe(SFTRecipe, None, overrides)


def build(mode: str, recipe: SFTRecipe, accelerator, args):
    """(the Setup `align sft` would train with for `mode`, experts chosen or None)."""
    model = load_base_model(recipe, accelerator.device)
    extra, chosen = {}, None
    if mode == "lora":
        model = apply_lora(model, lora_config(model, r=16, alpha=32.0))
    elif mode == "esft":
        n = max(1, args.score_tokens // args.seq)
        task = RandomTask(random_rows(n, args.seq, model.config.vocab_size, 1), [args.seq] * n)
        sums, samples, tokens = esft.score_experts(model, task, args.score_tokens, 0, 1, accelerator, False)
        choice = esft.choose(sums, moe_layers(model.config), "token", args.top_p, samples, tokens)
        extra["sliced"] = esft.freeze_for_esft(model, choice, False, False)
        chosen = choice.summary(model.config.n_routed_experts)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, 1e-5, (0.9, 0.95), 1e-8, 0.1)
    scheduler = build_scheduler(optimizer, "constant", 10)
    kind = {"full": FullSetup, "lora": LoRASetup, "esft": ESFTSetup}[mode]
    setup = kind(model, optimizer, scheduler, "single", accelerator, None,
                 head=loss_head(model, "single", accelerator), **extra)
    return setup, chosen


def measure(setup, recipe: SFTRecipe, accelerator, args) -> dict:
    """Median step time and peak memory of `align sft`'s step on one row of args.seq random tokens."""
    row = random_rows(1, args.seq, setup.unwrapped.config.vocab_size, 2)
    batch = pad_batch(row, pad_id=0)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        result = train_step(setup, [batch], args.seq - 1, recipe, accelerator)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
        losses.append(result["train/loss"])
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "step_s": statistics.median(times), "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def run(mode: str, layers: int | None, args) -> dict:
    recipe = bench_recipe(args, layers)
    accelerator = make_accelerator(recipe)
    setup, chosen = build(mode, recipe, accelerator, args)
    result = {"mode": mode, "layers": layers or "all", "experts": chosen, **measure(setup, recipe, accelerator, args)}
    print(json.dumps(result), flush=True)
    del setup
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_esft.json")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.07)
    parser.add_argument("--score-tokens", type=int, default=16384)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, a few seconds")
    args = parser.parse_args()
    args.preset, args.dtype = ("tiny", "float32") if args.smoke else ("deepseek-v2-lite", "bfloat16")
    if args.smoke:
        args.seq, args.steps, args.score_tokens, args.top_p = 64, 2, 256, 0.3
    slice_layers = 2 if args.smoke else 4
    results = [run("esft", None, args), run("lora", None, args),  # whole model: ESFT vs LoRA
               run("esft", slice_layers, args), run("full", slice_layers, args)]  # the slice: ESFT vs full FT
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": device, "torch": torch.__version__, "preset": args.preset, "seq": args.seq,
           "top_p": args.top_p, "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
