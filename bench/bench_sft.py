"""`align sft` itself (LoRA, packed 4096-token rows) vs transformers + peft and TRL's SFTTrainer, same chats, same run.

python bench/bench_sft.py --out bench/results/sft.json         # GPU: deepseek-v2-lite shape, random bf16 (~6 min)
python bench/bench_sft.py --smoke --out /tmp/sft.json           # CPU: tiny preset, fp32, short rows
python bench/bench_sft.py --align-only --processes 2 --out ...  # `accelerate launch --num_processes 2` vs 1 process
python bench/bench_sft.py --rows long --max-length 32768 --micro 1 --skip-trl --out ...  # long rows, one document each
python bench/bench_sft.py --full --layers 4 --out ...           # full fine-tuning of a 4-layer V2-Lite slice

Data: the script writes chats.jsonl, `--chats` chats of 200-2,000 tokens (uniform; user ~1/4, assistant
~3/4 of each), random number words, the committed tiny tokenizer (its 1,024 ids; the model keeps V2-Lite's
102,400-row LM head), and long.jsonl: single chats longer than a row, cut to one 4,096-token document each.

align: `python -m align.cli sft recipe.yaml` (the product, as a user runs it; `accelerate launch` for
--processes > 1): model.preset deepseek-v2-lite (bf16, random init), tokenizer tiny, data.packing true,
max_length 4096, train_on assistant, LoRA r 16 / alpha 32 on the default targets, micro_batch_size --micro,
grad_accum 1, gradient checkpointing, train.compile as the product's default (auto: each decoder layer
compiled on CUDA; --compile false for eager), AdamW lr 2e-4. tokens/s = the product's own `train/tokens_per_s`
(non-padding tokens of the global batch / step wall time, logged every step), median over the steps after
--warmup; peak = its `train/peak_gib`. The same on long.jsonl with packing false (rows of one 4,096-token
document: the unpacked step of equal row length) gives `packed_vs_unpacked`. `--rows long` makes those
long rows (one document of --max-length tokens each, packing false) the rows every implementation trains on
(TRL left out: its packing has no unpacked equivalent here). `--full`: no LoRA (full fine-tuning, every
implementation); `--layers N`: the preset cut to its first N decoder layers (model.config num_hidden_layers).

transformers + peft (the peer at its best built-in configuration): transformers' DeepseekV2ForCausalLM
(sdpa, experts `grouped_mm`, no compile), the same LoRA config (align.train.lora), gradient checkpointing
(non-reentrant; by default also timed without, --peer-checkpointing, and align compared with the faster),
AdamW, --peer-micro rows per step (default --micro: align's configuration and the peers' can differ,
each at its best); fed the very
packed rows `align sft` trained on (align.train.sft.prepare_data) as transformers takes packed rows:
input_ids, labels, position_ids, no attention mask; loss over all labelled positions by its own LM head.
TRL: trl.SFTTrainer on chats.jsonl (packing, bfd, max_length 4096, which turns on its padding-free
collator), same model, LoRA, bf16, the peers' micro-batch and (first) checkpointing setting.
`documents_isolated` says, per peer, whether its packed rows keep documents apart, checked on a small
config: transformers' logits of a packed row vs each document alone.

MFU = (6 x N_active x tokens/s + attention FLOP/s) / 790e12. N_active: non-embedding parameters a token
uses (attention, dense MLP, shared experts, top-k routed experts, router, LM head); attention FLOPs per
document of L tokens = layers x heads x (qk + v) x L(L+1) forward (causal), x3 with the backward;
recompute and LoRA not counted; 790 TFLOP/s: the bf16 dense matmul rate measured on this H200.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BASELINE_EXPERTS = "grouped_mm"  # not transformers' default per-expert loop: the peer at its best
PEAK_FLOPS = 790e12  # bf16 dense, measured on the H200 (8192^3 matmul)
LR = 2e-4


# --------------------------------------------------------------------------------------------- data


def number_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tiny-tokenizer tokens of random numbers (~3.85 tokens per number)."""
    return " ".join(str(rng.randint(0, 999)) for _ in range(max(1, round(tokens / 3.85))))


def write_chats(path: Path, count: int, low: int, high: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            n = rng.randint(low, high)
            messages = [{"role": "user", "content": number_text(rng, n // 4)},
                        {"role": "assistant", "content": number_text(rng, n - n // 4)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def write_data(work: Path, args) -> tuple[Path, Path]:
    chats, long = work / "chats.jsonl", work / "long.jsonl"
    write_chats(chats, args.chats, args.min_tokens, args.max_tokens, seed=0)
    write_chats(long, args.rows_per_step * (args.steps + 1), args.max_length + 200, args.max_length + 400, seed=1)
    return chats, long


# ------------------------------------------------------------------------------------------- align


def recipe_text(data: Path, run_dir: Path, args, packing: bool) -> str:
    """The recipe `align sft` runs (YAML)."""
    layers = f", config: {{num_hidden_layers: {args.layers}}}" if args.layers else ""
    split = f"batch_size: {args.batch_size}" if args.micro == "auto" else "grad_accum: 1"
    routed = str(args.routed_experts).lower()
    lora = "" if args.full else f"lora: {{r: 16, alpha: 32, dropout: 0.0, routed_experts: {routed}}}\n"
    return f"""\
model: {{preset: {args.preset}, dtype: {args.dtype}{layers}}}
tokenizer: {{path: tiny}}
data: {{train: {data}, max_length: {args.max_length}, packing: {str(packing).lower()}, train_on: assistant,
       truncation: right}}
{lora}optim: {{lr: {LR}, betas: [0.9, 0.95], weight_decay: 0.0}}
schedule: {{name: constant, warmup_steps: 0}}
train: {{steps: {args.steps}, micro_batch_size: {args.micro}, {split}, max_grad_norm: 1.0,
        bf16: {str(args.device == 'cuda').lower()}, gradient_checkpointing: {args.checkpointing},
        compile: {args.compile}, seed: 0, log_every: 1,
        eval_every: 0, save_every: 0}}
eval: {{exact_match: false}}
output: {{run_dir: {run_dir}, merge: false, progress: false}}
"""


def run_align(recipe: Path, run_dir: Path, processes: int, warmup: int) -> dict:
    """`align sft recipe` as a user runs it; tokens/s and peak memory from its metrics.jsonl."""
    cli = ["-m", "align.cli", "sft", str(recipe)]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), *cli]
    else:
        command = [sys.executable, *cli]
    start = time.perf_counter()
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path})
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    shutil.rmtree(run_dir)  # a preset base is saved in the run (31 GB at V2-Lite): keep the disk free
    steps = [r for r in records if "train/tokens_per_s" in r][warmup:]
    if not steps:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no step after the {warmup} warm-up steps")
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steps),
            "peak_gib": max((r.get("train/peak_gib", 0.0) for r in records), default=0.0),
            "steps_timed": len(steps), "processes": processes, "wall_s": time.perf_counter() - start,
            "losses": [r["train/loss"] for r in records if "train/loss" in r]}


def product_rows(recipe: Path) -> tuple[list[dict], list[int], list[int]]:
    """The packed rows `align sft` trains on (its own pipeline), their non-padding token counts, and
    the lengths of the documents in them."""
    from accelerate import Accelerator

    from align.recipe import SFTRecipe, load_recipe
    from align.train.run import load_tokenizer_for
    from align.train.sft import prepare_data

    parsed = load_recipe(SFTRecipe, recipe)
    data = prepare_data(parsed, load_tokenizer_for(parsed), Accelerator(cpu=True), lambda message: None)
    docs = []
    for row, end in zip(data.train, data.tokens, strict=True):
        row.setdefault("position_ids", list(range(len(row["input_ids"]))))  # unpacked: one document a row
        starts = [i for i, p in enumerate(row["position_ids"][:end]) if p == 0] + [end]
        docs += [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return data.train, data.tokens, docs


# ------------------------------------------------------------------------------------ transformers


def model_overrides(args) -> dict:
    """Config overrides of the benchmarked shape (--layers)."""
    return {"num_hidden_layers": args.layers} if args.layers else {}


def transformers_model(preset: str, dtype: torch.dtype, device: str, **overrides):
    """transformers' DeepseekV2ForCausalLM at the preset's shape: sdpa, grouped_mm experts, random init."""
    from transformers import DeepseekV2ForCausalLM as Reference

    from align.models import preset_config

    config = preset_config(preset, **overrides)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Reference._from_config(config, dtype=dtype)
    model.set_experts_implementation(BASELINE_EXPERTS)
    return model


def documents_isolated() -> bool:
    """Whether transformers (sdpa, grouped_mm) keeps packed documents apart when given position_ids."""
    model = transformers_model("tiny", torch.float32, "cpu").eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 1024, (n,), generator=gen) for n in (6, 9)]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=positions).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    return bool(torch.allclose(packed, alone, atol=1e-4, rtol=1e-4))


def lora_wrap(model, routed_experts: bool, full: bool = False, checkpointing: bool = True):
    """The peer as benchmarked: gradient checkpointing (unless off), and the LoRA config unless --full."""
    from align.train.lora import apply_lora, lora_config

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model if full else apply_lora(model, lora_config(model, r=16, alpha=32.0, routed_experts=routed_experts))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_transformers(rows: list[dict], tokens: list[int], args, checkpointing: bool = True) -> dict:
    """The peer's training step on the rows align trained on, `--steps` steps of `--peer-micro` rows."""
    base = transformers_model(args.preset, args.torch_dtype, args.device, **model_overrides(args))
    model = lora_wrap(base, args.routed_experts, args.full, checkpointing).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates, losses = [], []
    for step in range(args.steps):
        picked = [(step * args.peer_micro + i) % len(rows) for i in range(args.peer_micro)]
        batch = {key: torch.tensor([rows[i][key] for i in picked], device=args.device)
                 for key in ("input_ids", "labels", "position_ids")}
        sync(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        rates.append(sum(tokens[i] for i in picked) / (time.perf_counter() - start))
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    del model, opt
    free(args.device)
    return {"tokens_per_s": statistics.median(rates[args.warmup:]), "peak_gib": peak, "losses": losses,
            "micro_batch": args.peer_micro, "gradient_checkpointing": checkpointing}


def bench_transformers_settings(rows: list[dict], tokens: list[int], args, align_tps: float) -> dict:
    """transformers + peft once per --peer-checkpointing value (the first is `transformers`, the baseline
    of `speedup`; a setting that runs out of memory is recorded as such), and align's ratio to the fastest."""
    out = {}
    for i, value in enumerate(args.peer_checkpointing):
        name = "transformers" if i == 0 else f"transformers_checkpointing_{str(value).lower()}"
        try:
            out[name] = bench_transformers(rows, tokens, args, value)
        except torch.OutOfMemoryError as error:  # a configuration that does not fit is a result too
            if i == 0:
                raise
            free(args.device)
            out[name] = {"error": f"out of memory: {str(error).splitlines()[0]}", "micro_batch": args.peer_micro,
                         "gradient_checkpointing": value}
        print("transformers", json.dumps(out[name]), flush=True)
    fastest = max((r for r in out.values() if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
    return {**out, "baseline_tokens_per_s": out["transformers"]["tokens_per_s"],
            "baseline_peak_gib": out["transformers"]["peak_gib"],
            "speedup": align_tps / out["transformers"]["tokens_per_s"],
            "fastest_transformers": {k: fastest[k] for k in ("tokens_per_s", "peak_gib", "micro_batch",
                                                             "gradient_checkpointing")},
            "speedup_vs_fastest_transformers": align_tps / fastest["tokens_per_s"]}


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- TRL


def trl_clock(device: str):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time and tokens seen of each optimizer step."""

        def __init__(self):
            self.steps, self.start, self.seen = [], 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.steps.append((time.perf_counter() - self.start, state.num_input_tokens_seen - self.seen))

    return Clock()


def bench_trl(chats: Path, work: Path, args) -> dict:
    """trl.SFTTrainer on the same chats file: packing (bfd, padding-free), same model, LoRA and micro-batch."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from align.train.lora import lora_config
    from data_tools.tokenizer import load_tokenizer

    model = transformers_model(args.preset, args.torch_dtype, args.device, **model_overrides(args))
    config = SFTConfig(
        output_dir=str(work / "trl"), max_steps=args.steps, per_device_train_batch_size=args.peer_micro,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
        gradient_checkpointing=args.peer_checkpointing[0], gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=args.device == "cuda", max_length=args.max_length, packing=True, logging_steps=1,
        save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding", seed=0,
        use_cpu=args.device == "cpu", dataloader_num_workers=0,
    )
    clock = trl_clock(args.device)
    lora = lora_config(model, r=16, alpha=32.0, routed_experts=args.routed_experts)
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=str(chats))["train"],
                         processing_class=load_tokenizer("tiny"), peft_config=None if args.full else lora,
                         callbacks=[clock])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    rates = [tokens / seconds for seconds, tokens in clock.steps[args.warmup:]]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    del trainer, model
    free(args.device)
    return {"tokens_per_s": statistics.median(rates), "peak_gib": peak, "losses": losses,
            "tokens_per_step": statistics.median(tokens for _, tokens in clock.steps),
            "micro_batch": args.peer_micro, "gradient_checkpointing": args.peer_checkpointing[0]}


# ------------------------------------------------------------------------------------------ profile


def profile_product(recipe: Path, run_dir: Path, segments: bool, device: str) -> dict:
    """The product's own loop (align.train.sft.run_sft) in this process under torch.profiler: 2 steps
    after 3 untraced ones. segments=False forces the dense-mask attention the step used before the
    varlen layout. Returns the top kernels / ops by self device time, and per step the host waits for the GPU
    (stream / device synchronisations, the traced sync included) and scalar reads (`.item()` and the like, on
    CPU or GPU tensors)."""
    from accelerate.state import AcceleratorState
    from torch.profiler import ProfilerActivity, profile, schedule

    import align.models.layout as layout
    from align.recipe import SFTRecipe, load_recipe
    from align.train import sft

    AcceleratorState._reset_state(reset_partial_state=True)  # product_rows' CPU accelerator came first
    parsed = load_recipe(SFTRecipe, recipe, [f"output.run_dir={run_dir}", "train.steps=5"])
    step, enabled = sft.train_step, layout.segments_enabled
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=2, warmup=1, active=2)) as prof:
        def traced(*args, **kwargs):
            out = step(*args, **kwargs)
            sync(device)
            prof.step()
            return out

        sft.train_step = traced
        layout.segments_enabled = enabled if segments else (lambda x: False)
        try:
            sft.run_sft(parsed)
        finally:
            sft.train_step, layout.segments_enabled = step, enabled
            shutil.rmtree(run_dir, ignore_errors=True)
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:40]
    total = sum(getattr(e, key) for e in events) / 2
    reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense") / 2  # .item() etc, CPU or GPU
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")) / 2
    free(device)
    return {"layout": "segments" if segments else "dense_mask", "device_ms_per_step": total / 1e3,
            "gpu_syncs_per_step": syncs, "scalar_reads_per_step": reads,
            "top": [{"name": e.key[:80], "ms_per_step": getattr(e, key) / 2e3, "share": getattr(e, key) / 2 / total,
                     "calls_per_step": e.count / 2} for e in top]}


# -------------------------------------------------------------------------------------------- FLOPs


def active_params(config) -> int:
    """Non-embedding parameters a token uses: attention, dense MLP or shared + top-k routed experts and
    router, LM head."""
    h, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    q = h * heads * qk if config.q_lora_rank is None else h * config.q_lora_rank + config.q_lora_rank * heads * qk
    kv = h * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    attn = q + kv + heads * config.v_head_dim * h
    dense = 3 * h * config.intermediate_size
    moe = 3 * h * config.moe_intermediate_size * (config.n_shared_experts + config.num_experts_per_tok)
    moe += h * config.n_routed_experts
    n_dense = min(config.first_k_dense_replace, config.num_hidden_layers)
    layers = config.num_hidden_layers
    return layers * attn + n_dense * dense + (layers - n_dense) * moe + config.vocab_size * h


def flops_per_token(config, docs: list[int]) -> dict:
    """Training FLOPs per token: 6 N_active, and causal attention (fwd + bwd) averaged over the documents."""
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attn = 3 * config.num_hidden_layers * config.num_attention_heads * (qk + config.v_head_dim)
    attn_total = attn * sum(n * (n + 1) for n in docs)
    n_active = active_params(config)
    return {"n_active": n_active, "dense": 6 * n_active, "attention": attn_total / max(sum(docs), 1)}


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/sft.json")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, short rows")
    parser.add_argument("--chats", type=int, default=320)
    parser.add_argument("--micro", default="4", help="packed rows per step (every implementation); auto: align's "
                        "train.micro_batch_size auto splitting --batch-size rows (align only)")
    parser.add_argument("--batch-size", type=int, default=None, help="with --micro auto: rows per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--processes", type=int, default=1, help="align: also run on N processes (DDP)")
    parser.add_argument("--align-only", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-unpacked", action="store_true", help="no unpacked equal-length run")
    parser.add_argument("--profile", nargs="?", const="both", default=None, choices=["both", "segments"],
                        help="profile the product step (top 40 kernels): dense mask and segments, or segments only")
    parser.add_argument("--checkpointing", default="true", choices=["true", "false", "selective"],
                        help="align's train.gradient_checkpointing (the peers': --peer-checkpointing)")
    parser.add_argument("--peer-micro", type=int, default=None, help="the peers' rows per step (default --micro)")
    parser.add_argument("--peer-checkpointing", nargs="+", default=["true", "false"], choices=["true", "false"],
                        help="the peers' gradient checkpointing; transformers + peft runs once per value "
                             "(the first is `transformers`, the others `transformers_checkpointing_<value>`; "
                             "speedup_vs_fastest_transformers compares with the fastest), TRL with the first")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="align's train.compile (each decoder layer; default the product's auto: on for "
                             "align sft on CUDA; the peers are not compiled)")
    parser.add_argument("--rows", default="packed", choices=["packed", "long"],
                        help="packed: the mixed chats packed into --max-length rows; long: one document of "
                             "--max-length tokens per row (unpacked; TRL left out)")
    parser.add_argument("--max-length", type=int, default=None, help="row length (default 4096; smoke 256)")
    parser.add_argument("--layers", type=int, default=None, help="the preset's first N decoder layers only")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (no LoRA), every implementation")
    parser.add_argument("--routed-experts", action="store_true",
                        help="LoRA on the routed experts too (lora.routed_experts; peft's target_parameters for peers)")
    args = parser.parse_args()
    if args.micro != "auto":
        args.micro = int(args.micro)
    elif not (args.batch_size and args.align_only):
        raise SystemExit("--micro auto times align alone (--align-only) and needs --batch-size")
    args.device = "cpu" if args.smoke else "cuda"
    args.preset = "tiny" if args.smoke else "deepseek-v2-lite"
    args.dtype = "float32" if args.smoke else "bfloat16"
    args.torch_dtype = getattr(torch, args.dtype)
    default_length, args.min_tokens, args.max_tokens = (256, 20, 120) if args.smoke else (4096, 200, 2000)
    args.max_length = args.max_length or default_length
    if args.rows == "long":
        args.skip_trl = args.skip_unpacked = True  # the long rows are the rows; TRL packs, it has no such run
    if args.full and args.routed_experts:
        raise SystemExit("--full trains every weight: --routed-experts (LoRA on the experts) does not apply")
    if args.smoke:
        args.chats, args.steps, args.warmup = 40, 4, 1
        args.micro = "auto" if args.micro == "auto" else 2
    args.rows_per_step = args.batch_size if args.micro == "auto" else args.micro
    args.peer_micro = args.peer_micro or args.rows_per_step
    args.peer_checkpointing = [value == "true" for value in args.peer_checkpointing]
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    return args


def header(args, docs: list[int]) -> dict:
    import peft
    import transformers

    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return {"machine": machine, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                             "peft": peft.__version__},
            "preset": args.preset, "dtype": args.dtype, "packed": args.rows == "packed", "max_length": args.max_length,
            "micro_batch": args.micro, "steps": args.steps, "warmup_steps": args.warmup,
            "baseline_experts": BASELINE_EXPERTS,
            "rows": args.rows, "layers": args.layers, "full_finetuning": args.full,
            "lora": None if args.full else {"r": 16, "alpha": 32, "targets": "align default",
                                            "routed_experts": args.routed_experts},
            "documents": {"count": len(docs), "min": min(docs), "median": statistics.median(docs), "max": max(docs)}}


def run_product(args, work: Path, chats: Path, long: Path) -> dict:
    """align sft on the mixed chats (packed), on N processes if asked, and on long rows unpacked."""
    out = {}
    main_rows = (chats, True) if args.rows == "packed" else (long, False)
    runs = [("align", *main_rows, 1)] + ([] if args.skip_unpacked else [("align_unpacked", long, False, 1)])
    runs += [("align_ddp", *main_rows, args.processes)] if args.processes > 1 else []
    for name, data, packing, processes in runs:
        recipe, run_dir = work / f"{name}.yaml", work / name
        recipe.write_text(recipe_text(data, run_dir, args, packing))
        out[name] = run_align(recipe, run_dir, processes, args.warmup)
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "losses"}), flush=True)
    if "align_unpacked" in out:
        out["packed_vs_unpacked"] = out["align"]["tokens_per_s"] / out["align_unpacked"]["tokens_per_s"]
    if "align_ddp" in out:
        single = args.processes * out["align"]["tokens_per_s"]
        out["ddp_per_gpu_efficiency"] = out["align_ddp"]["tokens_per_s"] / single
    return out


def main() -> None:
    args = parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        chats, long = write_data(work, args)
        product = run_product(args, work, chats, long)
        rows, tokens, docs = product_rows(work / "align.yaml")
        from align.models import preset_config

        flops = flops_per_token(preset_config(args.preset, **model_overrides(args)), docs)
        result = {**header(args, docs), **product, "flops_per_token": flops}
        align_tps = product["align"]["tokens_per_s"]
        result.update({"align_tokens_per_s": align_tps, "align_peak_gib": product["align"]["peak_gib"],
                       "mfu": align_tps * (flops["dense"] + flops["attention"]) / PEAK_FLOPS,
                       "mfu_formula": "(6 * n_active + attention) FLOPs/token * tokens/s / 790e12"})
        if not args.align_only:
            result["documents_isolated"] = {"align": True, "transformers": documents_isolated()}
            result.update(bench_transformers_settings(rows, tokens, args, align_tps))
        if not (args.align_only or args.skip_trl):
            isolated = result["documents_isolated"]
            isolated["trl"] = isolated["transformers"]  # the same model, fed position_ids
            result["trl"] = bench_trl(chats, work, args)
            result.update({"trl_tokens_per_s": result["trl"]["tokens_per_s"], "trl_peak_gib": result["trl"]["peak_gib"],
                           "speedup_vs_trl": align_tps / result["trl"]["tokens_per_s"]})
            print("trl", json.dumps(result["trl"]), flush=True)
        if args.profile:
            result["profile"] = [profile_product(work / "align.yaml", work / f"profile-{on}", on, args.device)
                                 for on in ((True,) if args.profile == "segments" else (False, True))]
            for entry in result["profile"]:
                print(json.dumps(entry, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
