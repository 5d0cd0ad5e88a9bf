"""`align rl` on 1 and N GPUs, same lease: step time, generated tokens/s, per-GPU efficiency (issue 15).

python bench/bench_rl_scaling.py --out bench/results/rl_scaling.json               # GPU: 1 then 2 processes
python bench/bench_rl_scaling.py --out rl_scaling.json --processes 1 2 4          # more where lent
python bench/bench_rl_scaling.py --smoke --out /tmp/rl_scaling.json               # CPU: tiny preset, gloo

Each run is the product as users launch it: `python -m align.cli rl recipe.yaml` for 1 process and
`accelerate launch --num_processes N -m align.cli rl recipe.yaml` for N, through this script's --worker
entry (below). Recipe: recipes/deepseek_v2_lite_grpo.yaml's grpo / LoRA / optim sections with
model.preset deepseek-v2-lite (random bf16 weights), model.config.vocab_size cut to the tiny tokenizer's
1,024 ids, the tiny tokenizer, synthetic arithmetic prompts (data.synthetic), rewards exact_match +
length_penalty, no eval, no checkpoints; `grpo.prompts_per_step` is global, so N processes share the
same step of --prompts prompts x --generations completions (rollout_batch and micro_batch_size are per
process); with --weak the step grows with the processes (--prompts per process: the same rows per GPU).
Completion lengths are fixed at --completion-len: the worker calls the engine with eos_token_id None
(the only change to the product's path; a random model would otherwise end rows at random), so every
process decodes the same number of tokens per row.

Read from each run's metrics.jsonl: time/step and time/generated_tokens_per_s (global: all processes'
tokens over the phase's wall time), median over the steps after the first (warm-up: graph capture,
optimizer state). Per-GPU efficiency = tokens/s on N / (N x tokens/s on 1), and the same for step
throughput (1 / step time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "deepseek_v2_lite_grpo.yaml"


def recipe_text(args, run_dir: Path, processes: int) -> str:
    raw = yaml.safe_load(RECIPE.read_text())
    preset, dtype = ("tiny", "float32") if args.smoke else ("deepseek-v2-lite", "bfloat16")
    raw["model"] = {"preset": preset, "dtype": dtype, "config": {"vocab_size": 1024}}
    raw["tokenizer"] = {"path": "tiny"}
    raw["data"] = {"synthetic": {"train": 4096, "test": 1, "seed": 0}, "max_prompt_length": 64}
    penalty = next(r for r in raw["rewards"] if r["name"] == "length_penalty")
    raw["rewards"] = [{"name": "exact_match"}, penalty]
    raw.pop("eval", None)
    raw["grpo"].update({"prompts_per_step": args.prompts * (processes if args.weak else 1),
                        "num_generations": args.generations,
                        "max_completion_length": args.completion_len})
    raw["train"].update({"steps": args.steps, "save_every": 10**6, "sample_every": 10**6, "log_every": 1,
                         "bf16": not args.smoke})
    raw["output"] = {"run_dir": str(run_dir), "progress": False, "merge": False}
    return yaml.safe_dump(raw)


def run(recipe: Path, run_dir: Path, processes: int, smoke: bool) -> dict:
    worker = [str(Path(__file__).resolve()), "--worker", str(recipe)]
    if processes == 1:
        command = [sys.executable, *worker]
    elif smoke:  # CPU processes (gloo) through torchrun
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *worker]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), *worker]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path})
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if "time/step" in r][1:]
    if not steps:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no step after the warm-up step")
    shutil.rmtree(run_dir)
    return {"processes": processes, "steps_timed": len(steps),
            "step_s": statistics.median(r["time/step"] for r in steps),
            "generation_s": statistics.median(r["time/generation"] for r in steps),
            "update_s": statistics.median(r["time/update"] for r in steps),
            "generated_tokens_per_s": statistics.median(r["time/generated_tokens_per_s"] for r in steps)}


def worker(recipe: str) -> int:
    """`align rl recipe` with the engine's EOS switched off (fixed completion lengths)."""
    from align.cli import main
    from align.generation.engine import GenerationEngine

    original = GenerationEngine.generate

    def fixed_length(self, *a, **kw):
        kw["eos_token_id"] = None
        return original(self, *a, **kw)

    GenerationEngine.generate = fixed_length
    return main(["rl", recipe])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON result path")
    parser.add_argument("--worker", metavar="RECIPE", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU (gloo), small step")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps; the first is a warm-up")
    parser.add_argument("--prompts", type=int, default=32, help="grpo.prompts_per_step (global)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--weak", action="store_true",
                        help="prompts_per_step = --prompts x processes (the same rows per GPU), not fixed")
    parser.add_argument("--completion-len", type=int, default=512)
    args = parser.parse_args()
    if args.worker:
        raise SystemExit(worker(args.worker))
    if args.smoke:
        args.prompts, args.generations, args.completion_len, args.steps = 4, 2, 8, 2
    result = {"recipe": str(RECIPE.relative_to(ROOT)), "prompts_per_step": args.prompts, "weak": args.weak,
              "num_generations": args.generations, "completion_len": args.completion_len, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            run_dir = Path(tmp) / f"run{processes}"
            recipe = Path(tmp) / f"rl{processes}.yaml"
            recipe.write_text(recipe_text(args, run_dir, processes))
            try:
                result["runs"].append(run(recipe, run_dir, processes, args.smoke))
            except (subprocess.CalledProcessError, RuntimeError) as err:  # keep what ran; say what did not
                result.setdefault("failed", []).append({"processes": processes, "error": str(err)})
                continue
            print(json.dumps(result["runs"][-1]), flush=True)
    one = result["runs"][0] if result["runs"] else {"processes": 0}
    for r in result["runs"][1:]:
        n = r["processes"] / one["processes"]
        r["tokens_per_gpu_efficiency"] = r["generated_tokens_per_s"] / (n * one["generated_tokens_per_s"])
        work = n if args.weak else 1  # rows per step relative to the first run
        r["step_per_gpu_efficiency"] = work * one["step_s"] / (n * r["step_s"])
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except ImportError:
        pass
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
