"""The `align` command: thin argument parsing; the work lives in align.train and align.commands.

    align sft recipe.yaml [key.sub=value ...]
    align rl  recipe.yaml [key.sub=value ...]
    align rm  recipe.yaml [key.sub=value ...]
    align plot RUN_DIR
    align generate MODEL_DIR [--prompts rows.jsonl --out completions.jsonl | --interactive] ...

A subcommand is one `add_<name>_parser(subparsers)` function registered in SUBCOMMANDS; it sets
`func` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(name: str) -> Path:
    """A recipe file; a bare name such as `tiny_sft` also finds recipes/tiny_sft.yaml."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in (Path("recipes"), RECIPES_DIR):
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return path  # load_recipe reports the missing file


def add_recipe_parser(subparsers, name: str, help: str, description: str, example: str, func: Callable) -> None:
    """A subcommand taking a recipe file and key.sub=value overrides."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("recipe", help=f"recipe YAML file (or a name in recipes/, e.g. tiny_{name})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"override recipe values, e.g. {example}")
    parser.set_defaults(func=func)


def add_sft_parser(subparsers) -> None:
    add_recipe_parser(subparsers, "sft", "supervised fine-tuning from a YAML recipe",
                      "Supervised fine-tuning (LoRA or full) on chat data; see recipes/*.yaml.",
                      "train.steps=100 optim.lr=1e-4 lora=null", run_sft_command)


def run_sft_command(args: argparse.Namespace) -> int:
    from align.recipe import SFTRecipe, load_recipe
    from align.train.sft import run_sft

    recipe = load_recipe(SFTRecipe, resolve_recipe_path(args.recipe), args.overrides)
    return run_interruptible(run_sft, recipe, ["align", "sft", args.recipe, *args.overrides])


def run_interruptible(run: Callable, recipe, command: list[str]) -> int:
    """Run a training recipe; Ctrl-C stops it with what was saved and the command to continue (exit 130)."""
    try:
        run(recipe)
    except KeyboardInterrupt:
        from align.train.rundir import rerun_command

        if os.environ.get("RANK", "0") == "0":  # one message under torchrun / accelerate launch
            print(f"\ninterrupted; {rerun_command(command, recipe.output.run_dir)}", file=sys.stderr, flush=True)
        return 130
    return 0


def add_rl_parser(subparsers) -> None:
    add_recipe_parser(subparsers, "rl", "GRPO from an SFT checkpoint, from a YAML recipe",
                      "Group-relative policy optimisation against reward functions; see recipes/*.yaml.",
                      "train.steps=50 grpo.beta=0.04 grpo.num_generations=16", run_rl_command)


def run_rl_command(args: argparse.Namespace) -> int:
    from align.recipe import RLRecipe, load_recipe
    from align.train.grpo import run_rl

    recipe = load_recipe(RLRecipe, resolve_recipe_path(args.recipe), args.overrides)
    return run_interruptible(run_rl, recipe, ["align", "rl", args.recipe, *args.overrides])


def add_rm_parser(subparsers) -> None:
    add_recipe_parser(subparsers, "rm", "reward-model training (Bradley-Terry) from a YAML recipe",
                      "Train a reward model on preference pairs (chosen / rejected); see recipes/tiny_rm.yaml.",
                      "train.steps=100 rm.center_rewards_coefficient=0.01", run_rm_command)


def run_rm_command(args: argparse.Namespace) -> int:
    from align.recipe import RMRecipe, load_recipe
    from align.train.rm import run_rm

    recipe = load_recipe(RMRecipe, resolve_recipe_path(args.recipe), args.overrides)
    return run_interruptible(run_rm, recipe, ["align", "rm", args.recipe, *args.overrides])


def add_plot_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    parser.set_defaults(func=run_plot_command)


def run_plot_command(args: argparse.Namespace) -> int:
    from align.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_generate_parser(subparsers) -> None:
    from align.commands import generate

    p = subparsers.add_parser(
        "generate", help="sample completions from a checkpoint (JSONL prompts or interactive chat)",
        description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompts", help="JSONL file of prompts; omit for an interactive chat")
    p.add_argument("--out", help="output JSONL path (default: stdout)")
    p.add_argument("--interactive", action="store_true", help="chat on stdin even if --prompts is given")
    p.add_argument("--tokenizer", help="tokenizer directory or 'tiny' (default: MODEL_DIR)")
    p.add_argument("--chat-template", help="'deepseek_v2' or a Jinja file replacing the tokenizer's template")
    p.add_argument("--system", help="system message for interactive chat")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop id (repeatable)")
    p.add_argument("--max-batch", type=int, default=256, help="sequences decoded together")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")
    p.add_argument("--device", default="auto", help="auto (cuda:0 when present), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=generate.main_generate)


SUBCOMMANDS: list[Callable] = [add_sft_parser, add_rl_parser, add_rm_parser, add_plot_parser, add_generate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align",
                                     description="SFT, reward models and GRPO for DeepSeek-V2-family models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. User errors (recipe, data, paths, checkpoints) print `error: ...` and exit 2; a run
    stopped by its guards (align.train.guards: NaN / inf, no reward signal) prints why and exits 1;
    Ctrl-C exits 130. Set ALIGN_DEBUG=1 for the traceback."""
    from align.train.errors import TrainingStopped

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, TrainingStopped) as err:
        if os.environ.get("ALIGN_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingStopped) else 2


if __name__ == "__main__":
    sys.exit(main())
