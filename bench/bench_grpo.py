"""One GRPO step at DeepSeek-V2-Lite shape: align's GRPO building blocks vs TRL's GRPOTrainer, same run.

python bench/bench_grpo.py --out grpo.json                # GPU: deepseek-v2-lite, random bf16 weights (budget ~5 min)
python bench/bench_grpo.py --out grpo.json --skip-trl     # align only
python bench/bench_grpo.py --smoke --out smoke.json       # CPU: tiny preset, fp32, G=4, 4 prompts, 16+16 tokens
python bench/bench_grpo.py --skip-trl --routing-replay none rollout --out replay.json   # replay off vs on
python bench/bench_grpo.py --skip-trl --lengths variable --completion-len 1024 --mean-len 600 --out var.json

--lengths variable (issue 19: the benchmark sees what `align rl` sees): EOS is reachable. The LM head the
engine calls is wrapped (HazardHead, bench-only) so that at temperature 1 EOS is sampled with the same
probability h at every step: completion lengths are geometric(h) truncated at --completion-len (the cap,
i.e. grpo.max_completion_length; a row reaching it stops by length), mean (1 - (1-h)^cap) / h, with h solved
for --mean-len (default 0.6 x cap, as the V2-Lite recipe's ~600 of 1024). The timed variable step is then
compared with a fixed-length step at the same batch, the same prompts and the observed mean length rounded
(same head with EOS masked): tokens/s of generation, and variable / fixed (issue 19's target: >= 0.8).
The update trains on the same lm_head.weight (the fused log-prob kernel reads it directly), so in this mode
policy/logprob_mismatch compares two different heads and means nothing. --rollout-batch: decode slots
(grpo.rollout_batch; default all prompts x G completions at once). --fold / --compact on|off: the engine's
issue-19 options (default: the engine's, on on CUDA), to measure before and after in separate runs.

One step = --prompts prompts of --prompt-len random tokens x --generations completions of exactly
--completion-len tokens (no EOS can end them), sampled at temperature 1; a trivial reward (fraction of even
token ids in the completion); group-relative advantages; beta 0, one optimizer step (loss dapo) over all
completions in micro-batches of --micro-batch, gradient checkpointing (non-reentrant), LoRA r 16 / alpha 32 on
align's default targets (align.train.lora), AdamW lr 1e-6, grad clip 1.0.

align: GenerationEngine (n = G, CUDA graphs on Hopper bf16) -> rewards.score + group_advantages -> make_batch
-> align.train.grpo.update, the update `align rl` runs (per micro-batch: completion log-probs and entropy by
the fused linear log-prob kernel + grpo_loss under bf16 autocast; then clip, AdamW from align.train.optim,
constant schedule) on a LoRASetup (align.train.setup). Timed: generation (incl. decoding the texts), scoring,
update; one warm-up step first (graph capture, optimizer state), then the timed step. --routing-replay: one
or more of none | rollout (grpo.routing_replay), each timed the same way on the same model in turn (the
engine records the experts in both, as `align rl` does); every step reports `policy/logprob_mismatch`,
`moe/routing_agreement` and the expert-load summary of the update (align.train.moe_metrics). TRL is compared
with the first mode's steps.
TRL: transformers' own DeepseekV2ForCausalLM (sdpa, grouped_mm experts: its best built-in path) whose parameters ARE the
tensors align used (assigned, not copied; align's model and adapters are freed first), the same LoRA config,
trl.GRPOTrainer (transformers generate, use_vllm off, bf16, per_device_train_batch_size = --micro-batch,
gradient_accumulation_steps = prompts x G / micro-batch, so one optimizer step = one generation round).
--trl-steps optimizer steps (default 1: on an H100 one TRL step at the default sizes took 474 s, so two do
not fit a 10-minute call; the reported TRL step then includes its first-call costs, as align's first step
does, and both first steps are compared), each timed by a TrainerCallback; the split comes
from timers around GRPOTrainer._generate (generation + decode), _generate_and_score_completions (generation
+ scoring) and _calculate_rewards; TRL's own profiling_context durations are recorded too.
speedup = TRL seconds / align seconds for the timed step and each phase (> 1: align is faster). The JSON is
written after align's part too, so a failed TRL run still leaves align's numbers (and `trl_error`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import tempfile
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from align.generation import GenerationEngine
from align.generation.forward import unwrap
from align.models import build_model
from align.recipe import GRPOSection
from align.train.advantages import group_advantages
from align.train.grpo import update
from align.train.lora import apply_lora, lora_config
from align.train.optim import build_optimizer, build_scheduler
from align.train.rollout_batch import make_batch
from align.train.setup import LoRASetup, set_layer_modes

BASELINE_EXPERTS = "grouped_mm"  # not the default per-expert loop: the peer at its best

LR, MAX_GRAD_NORM = 1e-6, 1.0

# ------------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def even_ids(prompts, completions, completion_ids, **_) -> list[float]:
    """The trivial reward: fraction of even token ids in each completion (TRL reward signature)."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def special_ids(config) -> dict[str, int]:
    pad = config.vocab_size - 1
    if pad in (config.bos_token_id, config.eos_token_id):
        raise ValueError(f"vocab_size - 1 = {pad} is the BOS/EOS id; pick another pad id")
    return {"bos": config.bos_token_id, "eos": config.eos_token_id, "pad": pad}


def vocab_tokenizer(config):
    """In-memory WordLevel tokenizer over every model id: id i <-> "t{i}" (specials "<bos>", "<eos>", "<pad>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = special_ids(config)
    names = [f"t{i}" for i in range(config.vocab_size)]
    for name, idx in special.items():
        names[idx] = f"<{name}>"
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )
    tokenizer.padding_side = "left"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (special["eos"], special["pad"]), "special ids moved"
    return tokenizer


def random_prompts(count: int, length: int, config, seed: int) -> list[list[int]]:
    """Random ids that are no special token (so no prompt holds BOS / EOS / pad)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size - 1, (count, length), generator=gen)
    for idx in special_ids(config).values():
        ids[ids == idx] = 2 if idx != 2 else 3
    return ids.tolist()


# ------------------------------------------------------------------------------------------- align


class HazardHead(torch.nn.Module):
    """The LM head with EOS's logit set to logsumexp(other logits) + log(h / (1 - h)): at temperature 1, EOS
    is sampled with probability h at every step (h = 0: never). `weight` is the head's, so the training
    path (fused log-prob kernel over lm_head.weight) is unchanged."""

    def __init__(self, head: torch.nn.Linear, eos: int, hazard: float):
        super().__init__()
        self.head, self.eos = head, eos
        self.log_odds = math.log(hazard / (1 - hazard)) if hazard > 0 else float("-inf")

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()  # [..., V]
        is_eos = torch.arange(logits.shape[-1], device=logits.device) == self.eos
        others = logits.masked_fill(is_eos, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.where(is_eos, others + self.log_odds, logits)


def truncated_geometric_mean(hazard: float, cap: int) -> float:
    """Mean length when every step ends the row with probability `hazard`, the cap ending the rest."""
    return (1 - (1 - hazard) ** cap) / hazard if hazard > 0 else float(cap)


def hazard_for(mean: float, cap: int) -> float:
    """The per-step EOS probability whose cap-truncated geometric lengths average `mean` (bisection)."""
    if not 1 <= mean < cap:
        raise SystemExit(f"--mean-len {mean} must be in [1, --completion-len {cap})")
    low, high = 1e-9, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if truncated_geometric_mean(mid, cap) > mean else (low, mid)
    return (low + high) / 2


def length_summary(lengths: list[int], cap: int) -> dict:
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": sum(ordered) / len(ordered), "min": ordered[0], "p10": pick(0.1), "p50": pick(0.5),
            "p90": pick(0.9), "max": ordered[-1], "clipped_fraction": sum(n == cap for n in ordered) / len(ordered)}


def build_align(args):
    """Our model with random weights + LoRA + AdamW, as the LoRASetup `align rl` trains; also returns the base
    weights (for the TRL twin)."""
    model = build_model(args.preset, dtype=args.dtype, device_map=str(args.device), seed=0)
    base_state = dict(model.state_dict())  # the base tensors themselves (detached views, no copy)
    model = apply_lora(model, lora_config(model, r=16, alpha=32.0, routed_experts=args.routed_experts))
    layer_modes = SimpleNamespace(gradient_checkpointing=args.grad_ckpt, compile=args.compile)
    set_layer_modes(model, layer_modes, args.device, "rl")  # train.gradient_checkpointing / train.compile
    optimizer = build_optimizer(model, lr=LR)
    cuda = args.device.type == "cuda"
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    setup = LoRASetup(model, optimizer, build_scheduler(optimizer, "constant", 1), "single", accelerator, None)
    return setup, base_state


def grpo_section(args, replay: str) -> GRPOSection:
    """The GRPO options of the step: beta 0, one optimizer step (loss dapo), temperature 1."""
    return GRPOSection(prompts_per_step=args.prompts, num_generations=args.generations,
                       max_completion_length=args.completion_len, temperature=1.0, num_iterations=1, beta=0.0,
                       loss_type="dapo", micro_batch_size=args.micro_batch, routing_replay=replay)


ROUTING_KEYS = ("policy/logprob_mismatch", "moe/routing_agreement", "moe/load_max_over_mean", "moe/load_entropy")


def align_step(setup: LoRASetup, engine, tokenizer, prompt_ids, args, seed: int, replay: str,
               length: int | None = None, eos: bool = False) -> dict:
    """generation -> scoring -> update, each timed (synchronised). length: max new tokens (default
    --completion-len); eos: EOS ends rows (variable lengths), else every completion has `length` tokens."""
    from rewards import score
    from rewards.registry import WeightedReward

    device, g = args.device, args.generations
    length = length or args.completion_len
    reset_peak(device)
    sync(device)
    clock = time.perf_counter()
    results = engine.generate(prompt_ids, max_new_tokens=length, temperature=1.0, n=g,
                              eos_token_id=setup.model.config.eos_token_id if eos else None, seed=seed,
                              record_routing=True)
    flat = [c for row in results for c in row]
    completions = [c.token_ids for c in flat]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    sync(device)
    generated = time.perf_counter()
    prompts = [p for p in prompt_ids for _ in range(g)]
    totals, _, _ = score([WeightedReward("even_ids", even_ids)], prompts, texts, {"completion_ids": completions})
    advantages = group_advantages(torch.tensor(totals, dtype=torch.float32), g, "group")
    scored = time.perf_counter()
    routing = [c.routing for c in flat] if flat[0].routing is not None else None
    batch = make_batch(prompts, completions, advantages, special_ids(setup.model.config)["pad"], None, device,
                       [c.logprobs for c in flat], routing)
    del flat, results, routing
    setup.model.train()
    metrics, _ = update(setup, batch, grpo_section(args, replay), MAX_GRAD_NORM)
    sync(device)
    done = time.perf_counter()
    tokens = sum(len(c) for c in completions)
    assert eos or tokens == len(prompts) * length, "a completion stopped early"
    return {"max_new_tokens": length, "lengths": length_summary([len(c) for c in completions], length),
            "step_s": done - clock, "generation_s": generated - clock, "scoring_s": scored - generated,
            "update_s": done - scored, "generated_tokens": tokens, "tokens_per_s": tokens / (generated - clock),
            "update_tokens_per_s": batch.input_ids.numel() / (done - scored), "loss": metrics["loss"],
            "reward_mean": sum(totals) / len(totals), "peak_gib": peak_gib(device),
            **{key: metrics[key] for key in ROUTING_KEYS if key in metrics}}


def bench_align(args, tokenizer, prompt_ids) -> tuple[dict, dict]:
    """Warm-up step, then the timed step; frees the model and returns (result, base weights)."""
    setup, base_state = build_align(args)
    config = setup.model.config
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    variable = args.lengths == "variable"
    lm = unwrap(setup.model)
    head = lm.lm_head
    if variable:
        lm.lm_head = HazardHead(head, config.eos_token_id, args.hazard)
    engine = GenerationEngine(setup.model, max_batch=args.rollout_batch, **args.engine_options)
    out = {"trainable_params": trainable, "cuda_graphs": engine.use_graphs, "fold": engine.fold,
           "compact": engine.compact, "rollout_batch": args.rollout_batch, "routing_replay": {}}
    for replay in args.routing_replay:
        for name, seed in (("warmup", 1), ("timed", 2)):
            step = align_step(setup, engine, tokenizer, prompt_ids, args, seed, replay, eos=variable)
            out["routing_replay"].setdefault(replay, {})[name] = step
            out.setdefault(name, step)  # the first mode's steps are the ones TRL is compared with
            print("align", f"routing_replay={replay}", name, json.dumps(step), flush=True)
    if variable:
        out["variable"] = variable_vs_fixed(setup, engine, tokenizer, prompt_ids, args, out["timed"], head)
    lm.lm_head = head
    engine.release()
    del engine, setup
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return out, {"config": config, "state": base_state}


# --------------------------------------------------------------------------------------------- TRL


def variable_vs_fixed(setup, engine, tokenizer, prompt_ids, args, timed: dict, head) -> dict:
    """The timed variable-length step against fixed-length steps (warm-up + timed) at the same batch, prompts
    and mean length (the observed mean, rounded), through the same head with EOS masked."""
    lm = unwrap(setup.model)
    lm.lm_head = HazardHead(head, setup.model.config.eos_token_id, 0.0)
    mean = max(1, round(timed["lengths"]["mean"]))
    replay = args.routing_replay[0]
    for name, seed in (("warmup", 1), ("timed", 2)):
        fixed = align_step(setup, engine, tokenizer, prompt_ids, args, seed, replay, length=mean)
        print("align fixed", name, json.dumps(fixed), flush=True)
    result = {
        "distribution": f"geometric, per-step EOS probability {args.hazard:.6f}, truncated at {args.completion_len}",
        "expected_mean": truncated_geometric_mean(args.hazard, args.completion_len), "hazard": args.hazard,
        "lengths": timed["lengths"], "variable_tokens_per_s": timed["tokens_per_s"],
        "fixed_length": mean, "fixed_tokens_per_s": fixed["tokens_per_s"], "fixed": fixed,
        "ratio": timed["tokens_per_s"] / fixed["tokens_per_s"],
    }
    print(f"variable lengths ({result['distribution']}; observed {json.dumps(timed['lengths'])}): "
          f"{timed['tokens_per_s']:,.0f} tok/s; fixed {mean}: {fixed['tokens_per_s']:,.0f} tok/s; "
          f"ratio {result['ratio']:.3f}", flush=True)
    return result


def transformers_policy(config, state: dict, device: torch.device):
    """transformers' DeepseekV2ForCausalLM whose parameters ARE the given tensors (as bench_generate's twin)."""
    from transformers import DeepseekV2ForCausalLM as Reference
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        twin = Reference._from_config(config, dtype=state["lm_head.weight"].dtype)
    twin.load_state_dict(state, assign=True, strict=True)
    twin.model.rotary_emb = DeepseekV2RotaryEmbedding(config).to(device)  # non-persistent buffers
    twin.set_experts_implementation(BASELINE_EXPERTS)  # transformers' best built-in experts path
    meta = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers twin has tensors left on the meta device: {meta[:5]}")
    return twin


def make_clock(device: torch.device):
    """A TrainerCallback timing each optimizer step, plus timers it can wrap around trainer methods."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            reset_peak(device)
            self.steps.append(defaultdict(float, profiling=defaultdict(float)))
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.steps[-1]["step_s"] = time.perf_counter() - self.start
            self.steps[-1]["peak_gib"] = peak_gib(device)
            raw = {k: v for k, v in self.steps[-1].items() if k != "profiling"}
            print("trl step (raw timers)", json.dumps(raw), flush=True)  # kept even if a later step times out

        def wrap(self, trainer, method: str, key: str) -> None:
            inner = getattr(trainer, method)

            def timed(*args, **kwargs):
                sync(device)
                start = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    sync(device)
                    self.steps[-1][key] += time.perf_counter() - start

            setattr(trainer, method, timed)  # the instance attribute shadows the method

        def profiled(self, name: str, seconds: float) -> None:
            if self.steps:
                self.steps[-1]["profiling"][name] += seconds

    return StepClock()


@contextlib.contextmanager
def trl_profiling(clock):
    """Collect TRL's own profiling_context durations (it only sends them to wandb / mlflow / trackio)."""
    from trl.extras import profiling

    original = profiling.ProfilingContext._log_metrics

    def log(self, duration: float) -> None:
        clock.profiled(self.name, duration)
        original(self, duration)

    profiling.ProfilingContext._log_metrics = log
    try:
        yield
    finally:
        profiling.ProfilingContext._log_metrics = original


def trl_config(args, out_dir: str):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, max_steps=args.trl_steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts * args.generations // args.micro_batch,
        num_generations=args.generations, max_completion_length=args.completion_len, temperature=1.0,
        generation_kwargs={"min_new_tokens": args.completion_len},  # EOS is masked until the last token
        use_vllm=False, beta=0.0, loss_type="dapo", learning_rate=LR, adam_beta2=0.95, weight_decay=0.1,
        max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant", bf16=args.device.type == "cuda",
        gradient_checkpointing=args.grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, shuffle_dataset=False,
    )


def trl_steps(clock, log_history: list[dict], args) -> list[dict]:
    keep = ("loss", "reward", "completions/mean_length", "completions/clipped_ratio", "step_time", "num_tokens")
    logs = [e for e in log_history if "loss" in e]
    out = []
    for i, raw in enumerate(clock.steps):
        step = {k: v for k, v in raw.items() if k != "profiling"}
        gen_score = step.pop("generate_and_score_s", 0.0)
        step["scoring_s"] = gen_score - step["generation_s"]
        step["update_s"] = step["step_s"] - gen_score
        log = logs[i] if i < len(logs) else {}
        mean_length = log.get("completions/mean_length", args.completion_len)
        step["generated_tokens"] = round(mean_length * args.prompts * args.generations)
        step["tokens_per_s"] = step["generated_tokens"] / step["generation_s"]
        step["trl_log"] = {k: log[k] for k in keep if k in log}
        if mean_length != args.completion_len:
            print(f"WARNING: TRL completions averaged {mean_length} tokens, not {args.completion_len}", flush=True)
        step["trl_profiling_s"] = dict(raw["profiling"])
        out.append(step)
    return out


def bench_trl(args, base: dict, tokenizer, texts: list[str]) -> dict:
    """TRL's GRPOTrainer on transformers' model built on `base`'s tensors; --trl-steps timed optimizer steps."""
    import datasets
    from trl import GRPOTrainer

    from rewards.registry import WeightedReward

    policy = transformers_policy(base.pop("config"), base.pop("state"), args.device)
    model = apply_lora(policy, lora_config(policy, r=16, alpha=32.0, routed_experts=args.routed_experts))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock = make_clock(args.device)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model, reward_funcs=[WeightedReward("even_ids", even_ids)], args=trl_config(args, out_dir),
            train_dataset=datasets.Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
            callbacks=[clock],
        )
        for method, key in (("_generate", "generation_s"), ("_generate_and_score_completions", "generate_and_score_s"),
                            ("_calculate_rewards", "rewards_s")):
            clock.wrap(trainer, method, key)
        with trl_profiling(clock):
            train = trainer.train()
        steps = trl_steps(clock, trainer.state.log_history, args)
    for i, step in enumerate(steps):
        print("trl", "warmup" if i < len(steps) - 1 else "timed", json.dumps(step), flush=True)
    out = {"trainable_params": trainable, "steps": steps, "timed": steps[-1], "train_runtime_s": train.metrics.get(
        "train_runtime"), "generation_batch_size": trainer.args.generation_batch_size}
    del trainer, model, policy
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, fp32, small sizes")
    parser.add_argument("--skip-trl", action="store_true", help="time align only")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16; smoke 4)")
    parser.add_argument("--generations", type=int, default=None, help="completions per prompt G (default 8; smoke 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; smoke 16)")
    parser.add_argument("--completion-len", type=int, default=None, help="completion tokens (default 512; smoke 16)")
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per forward/backward (both sides)")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="align's train.compile (auto: the product's default for align rl)")
    parser.add_argument("--trl-steps", type=int, default=1, help="TRL optimizer steps; the last one is reported")
    parser.add_argument("--routing-replay", nargs="+", choices=("none", "rollout"), default=["none"],
                        help="grpo.routing_replay mode(s) of align's steps, timed in turn (default none)")
    parser.add_argument("--lengths", choices=("fixed", "variable"), default="fixed",
                        help="fixed: exactly --completion-len tokens; variable: EOS reachable, geometric lengths "
                             "capped at --completion-len, compared with fixed at the observed mean (see above)")
    parser.add_argument("--mean-len", type=float, default=None,
                        help="variable: target mean completion length (default 0.6 x --completion-len)")
    parser.add_argument("--rollout-batch", type=int, default=None,
                        help="decode slots, grpo.rollout_batch (default prompts x G)")
    parser.add_argument("--routed-experts", action="store_true",
                        help="LoRA on the routed experts too (lora.routed_experts)")
    for name in ("fold", "compact"):
        parser.add_argument(f"--{name}", choices=("auto", "on", "off"), default="auto",
                            help=f"the engine's {name} option (auto: its default, on on CUDA): before / after issue 19")
    args = parser.parse_args()
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    args.engine_options = {name: getattr(args, name) == "on" for name in ("fold", "compact")
                           if getattr(args, name) != "auto"}
    if args.smoke:
        args.preset, args.dtype, args.device = "tiny", torch.float32, torch.device("cpu")
        torch.set_num_threads(1)  # measured: 2 intra-op threads on a busy 2-core box made TRL's generate ~100x slower
        defaults = {"prompts": 4, "generations": 4, "prompt_len": 16, "completion_len": 16}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        args.preset, args.dtype, args.device = "deepseek-v2-lite", torch.bfloat16, torch.device("cuda")
        defaults = {"prompts": 16, "generations": 8, "prompt_len": 256, "completion_len": 512}
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key) or value)
    total = args.prompts * args.generations
    args.rollout_batch = args.rollout_batch or total
    args.hazard = None
    if args.lengths == "variable":
        if not args.skip_trl:
            raise SystemExit("--lengths variable times align only: add --skip-trl")
        args.hazard = hazard_for(args.mean_len or 0.6 * args.completion_len, args.completion_len)
    args.micro_batch = min(args.micro_batch, total)
    if args.generations < 2 or total % args.micro_batch or args.trl_steps < 1:
        raise SystemExit(f"need --generations >= 2, --trl-steps >= 1 and --micro-batch dividing prompts x G = {total}")
    return args


def write(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def header(args) -> dict:
    import peft
    import transformers
    import trl

    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": device, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                       "trl": trl.__version__, "peft": peft.__version__},
        "preset": args.preset, "dtype": str(args.dtype),
        "prompts": args.prompts, "generations": args.generations, "prompt_len": args.prompt_len,
        "completion_len": args.completion_len, "micro_batch": args.micro_batch,
        "gradient_checkpointing": args.grad_ckpt, "compile": args.compile,
        "lora": {"r": 16, "alpha": 32, "routed_experts": args.routed_experts}, "beta": 0.0, "loss_type": "dapo",
        "baseline_experts": BASELINE_EXPERTS,
        "routing_replay": args.routing_replay, "lengths": args.lengths, "rollout_batch": args.rollout_batch,
        "eos_hazard": args.hazard, "engine_options": args.engine_options,
    }


def speedups(align: dict, trl: dict) -> dict:
    """TRL seconds / align seconds per phase of the timed step (> 1: align is faster)."""
    keys = ("step_s", "generation_s", "scoring_s", "update_s")
    return {key.removesuffix("_s"): trl[key] / align[key] for key in keys if align.get(key) and trl.get(key)}


def summary(result: dict) -> str:
    rows = [("", "step s", "generation s", "scoring s", "update s", "gen tok/s", "peak GiB")]
    for name in ("align", "trl"):
        if name in result:
            t = result[name]["timed"]
            peak = "-" if t["peak_gib"] is None else f"{t['peak_gib']:.1f}"
            rows.append((name, f"{t['step_s']:.2f}", f"{t['generation_s']:.2f}", f"{t['scoring_s']:.3f}",
                         f"{t['update_s']:.2f}", f"{t['tokens_per_s']:,.0f}", peak))
    lines = ["".join(f"{cell:>14}" for cell in row) for row in rows]
    for replay, steps in result.get("align", {}).get("routing_replay", {}).items():
        t = steps["timed"]
        lines.append(f"align routing_replay={replay}: step {t['step_s']:.2f} s, update {t['update_s']:.2f} s, "
                     + ", ".join(f"{key} {t[key]:.4g}" for key in ROUTING_KEYS if key in t))
    return "\n".join(lines)


def main() -> None:
    from align.models import preset_config

    start = time.perf_counter()
    args = parse_args()
    config = preset_config(args.preset)
    tokenizer = vocab_tokenizer(config)
    steps = 1 if args.skip_trl else args.trl_steps
    prompt_ids = random_prompts(args.prompts * max(steps, 1), args.prompt_len, config, seed=0)
    texts = [" ".join(f"t{i}" for i in ids) for ids in prompt_ids]
    assert tokenizer(texts[0])["input_ids"] == prompt_ids[0], "prompt text does not tokenize to its ids"
    result = header(args)
    print(json.dumps(result), flush=True)
    result["align"], base = bench_align(args, tokenizer, prompt_ids[: args.prompts])
    write(result, args.out)
    if not args.skip_trl:
        print(f"align done after {time.perf_counter() - start:.0f} s; TRL next", flush=True)
        try:
            result["trl"] = bench_trl(args, base, tokenizer, texts)
        except BaseException as exc:  # keep align's numbers and say what failed, then fail
            result["trl_error"] = f"{type(exc).__name__}: {exc}"
            write(result, args.out)
            raise
        mine = result["align"]["timed" if args.trl_steps > 1 else "warmup"]  # first step against first step
        result["speedup"] = speedups(mine, result["trl"]["timed"])
    del base
    result["wall_s"] = time.perf_counter() - start
    write(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("align", "trl")}, indent=2))
    print(summary(result), flush=True)


if __name__ == "__main__":
    main()
