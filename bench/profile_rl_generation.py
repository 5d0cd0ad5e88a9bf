"""Where the generation phase of a real `align rl` step goes (issue 19, part 1): the product's own loop
(align.train.grpo.run_rl) on the V2-Lite GRPO recipe, instrumented, not a benchmark copy.

python bench/profile_rl_generation.py --out rl_generation.json                       # GPU: V2-Lite shape
python bench/profile_rl_generation.py --out rl_generation.json --mean-len 600        # EOS reachable (variable)
python bench/profile_rl_generation.py --out off.json --mean-len 600 --fold off --compact off   # before issue 19
python bench/profile_rl_generation.py --smoke --out smoke.json                       # CPU: tiny preset

Recipe: recipes/deepseek_v2_lite_grpo.yaml (grpo section as written: 32 prompts x 8, <= 1024 tokens,
rollout_batch 256, beta 0.04, LoRA r 16) with model.preset=deepseek-v2-lite (random bf16 weights) instead
of model.path, the tiny tokenizer and synthetic arithmetic prompts (data.synthetic; short prompts: ~20
tokens), rewards exact_match + the recipe's length penalty, no eval, no checkpoints. --steps GRPO steps run
(default 2); the first is a warm-up (graph capture, optimizer state), every later one is reported.
A random model never says EOS, so every row runs to the cap (fixed lengths) unless --mean-len is given:
then the LM head the engine calls is bench_grpo's HazardHead (geometric lengths of that mean, truncated
at the cap; the training path is unchanged).

Measured per reported step, inside the product's loop (timers wrapped around the engine's own methods):
- every decode step: the live rows (host view at the last refill), the step width (compaction) and the
  attention length; its GPU time (CUDA events around GenerationEngine.run_step) and host time (wall
  time of the call, which with CUDA graphs is the launch);
- prefill passes: GPU and host time, tokens; host bookkeeping: collect_finished (its host read waits
  for the GPU), admit (less its prefill), compaction;
- the whole generation phase (grpo.rollout, wall, synchronised) and its tokens/s, the GPU-busy share
  (sum of decode + prefill GPU time over wall time), and the rest of the step (scoring, update);
- with --torch-profiler, one more step under torch.profiler: top ops by device time in the rollout.
Output: --out JSON with a per-step table binned by live batch, and the raw per-decode-step rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's align, not an installed one

from align.generation import engine as engine_module  # noqa: E402
from align.generation.forward import unwrap  # noqa: E402
from align.recipe import RLRecipe, load_recipe  # noqa: E402
from align.train import grpo  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "deepseek_v2_lite_grpo.yaml"


class Clock:
    """GPU intervals by CUDA events (read after the round), host intervals by perf_counter; on CPU both are
    wall time (ops run synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Recorder:
    """Wraps the engine's methods for the duration of the run; rows of the current round."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.active = False
        self.live = 0
        self.steps: list[dict] = []
        self.prefills: list[dict] = []
        self.host_ms: dict[str, float] = defaultdict(float)
        self.saved: list[tuple[object, str, object]] = []

    def patch(self, owner, name: str, wrapper) -> None:
        original = getattr(owner, name)
        self.saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def install(self) -> None:
        rec = self

        def run_step(original):
            def wrapped(engine, attend_len, sampling, max_new):
                if not rec.active:
                    return original(engine, attend_len, sampling, max_new)
                host = time.perf_counter()
                start = rec.clock.mark()
                original(engine, attend_len, sampling, max_new)
                end = rec.clock.mark()
                rec.steps.append({"live": rec.live, "width": engine.width, "attend_len": attend_len,
                                  "events": (start, end), "host_ms": (time.perf_counter() - host) * 1e3})
            return wrapped

        def attend_len(original):
            def wrapped(run, live):
                rec.live = len(live)
                return original(run, live)
            return wrapped

        def prefill_chunk(original):
            def wrapped(run, chunk):
                if not rec.active:
                    return original(run, chunk)
                host = time.perf_counter()
                start = rec.clock.mark()
                original(run, chunk)
                end = rec.clock.mark()
                rec.prefills.append({"prompts": len(chunk), "tokens": sum(len(p) for _, p in chunk),
                                     "events": (start, end), "host_ms": (time.perf_counter() - host) * 1e3})
            return wrapped

        def host_timed(key):
            def wrap(original):
                def wrapped(*args, **kwargs):
                    if not rec.active:
                        return original(*args, **kwargs)
                    host = time.perf_counter()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        rec.host_ms[key] += (time.perf_counter() - host) * 1e3
                return wrapped
            return wrap

        self.patch(engine_module.GenerationEngine, "run_step", run_step)
        self.patch(engine_module._Run, "attend_len", attend_len)
        self.patch(engine_module._Run, "_prefill_chunk", prefill_chunk)
        for name in ("collect_finished", "admit", "compact"):
            if hasattr(engine_module._Run, name):
                self.patch(engine_module._Run, name, host_timed(name))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)

    def reset(self) -> None:
        self.steps, self.prefills, self.host_ms = [], [], defaultdict(float)

    def resolve(self) -> None:
        """Event pairs -> GPU milliseconds (after a synchronise)."""
        for row in self.steps + self.prefills:
            if "events" in row:
                row["gpu_ms"] = self.clock.ms(*row.pop("events"))


def live_bins(steps: list[dict], slots: int) -> list[dict]:
    """Decode steps grouped by live rows (eighths of the slots): count, mean GPU / host ms, tokens per ms."""
    bins: dict[int, list[dict]] = defaultdict(list)
    for row in steps:
        bins[min(7, (row["live"] * 8 - 1) // max(slots, 1))].append(row)
    out = []
    for index in sorted(bins, reverse=True):
        rows = bins[index]
        gpu = sum(r["gpu_ms"] for r in rows)
        out.append({"live": f"{index * slots // 8 + 1}-{(index + 1) * slots // 8}", "steps": len(rows),
                    "widths": sorted({r["width"] for r in rows}, reverse=True),
                    "gpu_ms_per_step": gpu / len(rows), "host_ms_per_step": sum(r["host_ms"] for r in rows) / len(rows),
                    "live_rows_per_gpu_ms": sum(r["live"] for r in rows) / max(gpu, 1e-9)})
    return out


def round_summary(rec: Recorder, wall_s: float, tokens: int, slots: int) -> dict:
    decode_gpu = sum(r["gpu_ms"] for r in rec.steps)
    prefill_gpu = sum(r["gpu_ms"] for r in rec.prefills)
    prefill_host = sum(r["host_ms"] for r in rec.prefills)
    host = dict(rec.host_ms)
    if "admit" in host:
        host["admit_without_prefill"] = host.pop("admit") - prefill_host
    return {
        "generation_s": wall_s, "generated_tokens": tokens, "tokens_per_s": tokens / wall_s,
        "decode_steps": len(rec.steps), "decode_gpu_s": decode_gpu / 1e3,
        "decode_host_s": sum(r["host_ms"] for r in rec.steps) / 1e3,
        "prefill": {"passes": len(rec.prefills), "tokens": sum(r["tokens"] for r in rec.prefills),
                    "gpu_s": prefill_gpu / 1e3, "host_s": prefill_host / 1e3},
        "host_bookkeeping_s": {k: v / 1e3 for k, v in host.items()},
        "gpu_busy_share": (decode_gpu + prefill_gpu) / 1e3 / wall_s,
        "by_live_batch": live_bins(rec.steps, slots),
        "full_width_gpu_ms_per_step": _mean([r["gpu_ms"] for r in rec.steps if r["live"] == slots]),
        "steps": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rec.steps],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def make_recipe(args, run_dir: Path) -> RLRecipe:
    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"] = {"preset": args.preset, "dtype": "bfloat16" if args.device.type == "cuda" else "float32"}
    raw["tokenizer"] = {"path": "tiny"}
    raw["data"] = {"synthetic": {"train": 4096, "test": 1, "seed": 0}, "max_prompt_length": 64}
    penalty = next(r for r in raw["rewards"] if r["name"] == "length_penalty")
    raw["rewards"] = [{"name": "exact_match"}, penalty]
    raw.pop("eval", None)
    raw["train"].update({"steps": args.steps, "save_every": 10**6, "sample_every": 10**6,
                         "bf16": args.device.type == "cuda"})
    raw["output"] = {"run_dir": str(run_dir), "progress": False, "merge": False}
    if args.smoke:
        raw["grpo"].update({"prompts_per_step": 4, "num_generations": 4, "max_completion_length": 16,
                            "micro_batch_size": 8, "rollout_batch": 16})
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(RLRecipe, path, list(args.override))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, 4 x 4 completions of <= 16 tokens")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps; the first is a warm-up")
    parser.add_argument("--mean-len", type=float, default=None,
                        help="EOS reachable: geometric lengths of this mean, truncated at max_completion_length")
    parser.add_argument("--torch-profiler", action="store_true", help="one more step under torch.profiler")
    for name in ("fold", "compact"):
        parser.add_argument(f"--{name}", choices=("auto", "on", "off"), default="auto",
                            help=f"the rollout engine's {name} option (auto: its default, on on CUDA)")
    parser.add_argument("override", nargs="*", help="recipe overrides key=value (e.g. grpo.rollout_batch=128)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.device = "tiny", torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        args.preset, args.device = "deepseek-v2-lite", torch.device("cuda")
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first is a warm-up)")
    work = Path(tempfile.mkdtemp(prefix="rl_generation_"))
    recipe = make_recipe(args, work / "run")
    g = recipe.grpo
    steps = args.steps + (1 if args.torch_profiler else 0)
    recipe.train.steps = steps
    result = {"device": torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "preset": args.preset, "prompts_per_step": g.prompts_per_step,
              "num_generations": g.num_generations, "max_completion_length": g.max_completion_length,
              "rollout_batch": g.rollout_batch, "beta": g.beta, "overrides": args.override, "steps": []}
    clock, rec = Clock(args.device), Recorder(Clock(args.device))
    rec.install()
    rollout, step_fn = grpo.rollout, grpo.rl_step
    state = {"step": 0, "head": None}
    slots = min(g.rollout_batch, g.prompts_per_step * g.num_generations)

    def timed_rollout(engine, rows, recipe, step, tokenizer, round_=0, keys=None):
        lm = unwrap(engine.model)
        if args.mean_len is not None and state["head"] is None:
            from bench_grpo import HazardHead, hazard_for

            hazard = hazard_for(args.mean_len, g.max_completion_length)
            state["head"] = HazardHead(lm.lm_head, tokenizer.eos_token_id, hazard)
            result["eos_hazard"] = hazard
        original = lm.lm_head
        if state["head"] is not None:
            lm.lm_head = state["head"]
        profiled = args.torch_profiler and state["step"] == steps - 1
        rec.reset()
        rec.active = state["step"] >= 1 and not profiled
        clock.sync()
        start = time.perf_counter()
        try:
            if profiled:
                result["torch_profiler"] = profile_rollout(rollout, args.device, engine, rows, recipe, step,
                                                           tokenizer, round_, keys)
                return result["torch_profiler"].pop("rollout")
            out = rollout(engine, rows, recipe, step, tokenizer, round_, keys)
        finally:
            lm.lm_head = original
        clock.sync()
        wall = time.perf_counter() - start
        if rec.active:
            rec.resolve()
            tokens = sum(len(c) for c in out.completion_ids)
            summary = round_summary(rec, wall, tokens, slots)
            summary["lengths"] = sorted(len(c) for c in out.completion_ids)[:: max(1, len(out.completion_ids) // 16)]
            summary["engine"] = {"fold": engine.fold, "compact": engine.compact, "cuda_graphs": engine.use_graphs,
                                 "folded_gib": engine.folded.nbytes() / 2**30}
            result["steps"].append(summary)
            rec.active = False
        return out

    def timed_step(run, step, order):
        state["step"] = step - run.setup.start_step
        clock.sync()
        start = time.perf_counter()
        out = step_fn(run, step, order)
        clock.sync()
        if result["steps"] and "step_s" not in result["steps"][-1] and state["step"] >= 1:
            result["steps"][-1].update({"step_s": time.perf_counter() - start,
                                        **{k: out.metrics[k] for k in ("time/scoring", "time/update")
                                           if k in out.metrics}})
        return out

    import align.generation as generation

    engine_class = generation.GenerationEngine
    options = {name: {"on": True, "off": False}[getattr(args, name)] for name in ("fold", "compact")
               if getattr(args, name) != "auto"}

    class Engine(engine_class):  # the product's engine, with --fold / --compact when given
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**options, **kw})

    grpo.rollout, grpo.rl_step, generation.GenerationEngine = timed_rollout, timed_step, Engine
    try:
        grpo.run_rl(recipe)
    finally:
        grpo.rollout, grpo.rl_step, generation.GenerationEngine = rollout, step_fn, engine_class
        rec.uninstall()
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for summary in result["steps"]:
        print(f"generation {summary['generation_s']:.2f} s, {summary['tokens_per_s']:,.0f} tok/s, "
              f"{summary['decode_steps']} decode steps (GPU {summary['decode_gpu_s']:.2f} s, host "
              f"{summary['decode_host_s']:.2f} s), prefill GPU {summary['prefill']['gpu_s']:.3f} s, "
              f"GPU busy {summary['gpu_busy_share']:.0%}, bookkeeping "
              f"{json.dumps({k: round(v, 3) for k, v in summary['host_bookkeeping_s'].items()})}")
        for row in summary["by_live_batch"]:
            print(f"  live {row['live']:>9}: {row['steps']:5d} steps, widths {row['widths']}, "
                  f"GPU {row['gpu_ms_per_step']:.2f} ms/step, host {row['host_ms_per_step']:.2f} ms/step")


def profile_rollout(rollout, device: torch.device, *args) -> dict:
    """One rollout under torch.profiler: top ops by self device (CPU: CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        out = rollout(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:20]
    launches = sum(e.count for e in events if e.key in ("cudaGraphLaunch",))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    return {"rollout": out, "total_ms": total / 1e3, "graph_launches": launches, "gpu_syncs": syncs,
            "top": [{"name": e.key[:80], "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / max(total, 1),
                     "calls": e.count} for e in top]}


if __name__ == "__main__":
    main()
