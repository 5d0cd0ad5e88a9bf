"""The `align` command end to end: the tiny recipe (shortened by overrides) with its expected loss
curve, `align plot`, and user errors (exit code 2, the message, nothing written)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.cli import build_parser, main
from align.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_sft.yaml"

# Mean train loss over each 5-step window (and eval loss at steps 15 and 30) of the shortened tiny
# recipe below (30 steps, all inside the 50-step warmup), recorded on a 2-core CPU with torch 2.13.
# Runs are deterministic on one machine; other CPUs / thread counts may sum float32 in another
# order (and the model code may change its op order), so the tolerance is 3% relative (the H200 host's
# CPU was 2.2% off at one point of an earlier curve).
EXPECTED = {5: 6.5696, 10: 5.9092, 15: 5.3957, 20: 4.8404, 25: 4.2094, 30: 3.4473}
EXPECTED_EVAL = {15: 5.0358, 30: 2.9468}
TOLERANCE = 0.03
SHORT = ["train.steps=30", "train.log_every=5", "train.eval_every=15", "train.save_every=15",
         "data.synthetic.train=4000", "data.synthetic.test=64", "train.deterministic=true", "output.progress=false"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_subcommands_registered(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "rl" in out and "rm" in out and "plot" in out and "generate" in out
    parser = build_parser()
    assert parser.parse_args(["sft", "r.yaml", "a=1", "b.c=2"]).overrides == ["a=1", "b.c=2"]


def test_tiny_recipe_end_to_end(tmp_path):
    run = tmp_path / "tiny"
    result = run_cli("sft", str(TINY), *SHORT, f"output.run_dir={run}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "resolved recipe" in out and "length min" in out and "eval exact match:" in out
    assert (run / "recipe.yaml").read_text().startswith("model:")
    records = read_metrics(run)
    curve = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(curve) == sorted(EXPECTED)
    assert curve == pytest.approx(EXPECTED, rel=TOLERANCE), curve
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert {k: r["eval/loss"] for k, r in evals.items()} == pytest.approx(EXPECTED_EVAL, rel=TOLERANCE)
    assert 0.0 <= evals[30]["eval/exact_match"] <= 1.0
    assert all(k in records[0] for k in ("train/lr", "train/grad_norm", "train/tokens_per_s"))
    assert (run / "checkpoints" / "step-000015" / "model" / "config.json").is_file()
    assert (run / "checkpoints" / "step-000030" / "optimizer.safetensors").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run / "final" / name).is_file()
    assert not list(run.rglob(".*.tmp*")), "temporary directories left behind"

    pytest.importorskip("matplotlib")
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert (run / "plots" / "eval_exact_match.png").is_file()


def test_bad_recipe_key_exits_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["sft", str(TINY), "train.stepz=3", f"output.run_dir={run}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.stepz'" in err and "did you mean 'train.steps'" in err
    assert not run.exists()


def test_bad_recipe_value_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text, n = re.subn(r"micro_batch_size: \d+", "micro_batch_size: lots", TINY.read_text())
    assert n == 1
    bad.write_text(text)
    assert main(["sft", str(bad), f"output.run_dir={tmp_path / 'run'}"]) == 2
    assert "key 'train.micro_batch_size' expects int or one of 'auto', got 'lots'" in capsys.readouterr().err
    assert main(["sft", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot_without_metrics_fails_cleanly(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def _sigint_as_from_a_shell() -> None:
    """The child starts with SIGINT at its default, unblocked, whatever earlier tests left in this process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_cleanly_with_the_resume_command(tmp_path):
    """SIGINT after the first checkpoint: exit 130, no traceback, what was saved and how to continue."""
    run = tmp_path / "run"
    args = ["sft", str(TINY), "train.steps=200", "train.save_every=2", "train.log_every=1", "data.synthetic.train=400",
            "model.config.num_hidden_layers=1", "train.micro_batch_size=192", "eval.exact_match=false",
            "output.progress=false", f"output.run_dir={run}"]  # 192 rows: steps slow enough that it cannot finish first
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_sigint_as_from_a_shell)
    start = time.monotonic()
    while not list(run.glob("checkpoints/step-*")) and proc.poll() is None and time.monotonic() < start + 240:
        time.sleep(0.1)
    seen = f"signal sent {time.monotonic() - start:.1f} s in, child already exited: {proc.poll() is not None}, " \
           f"checkpoints then: {sorted(p.name for p in run.glob('checkpoints/step-*'))[:3]}\n"
    proc.send_signal(signal.SIGINT)
    for _ in range(3):  # a Ctrl-C lost in the child (seen once in a full CI run, cause not found): press again
        try:
            out, err = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            seen += "SIGINT sent again after 10 s\n"
            proc.send_signal(signal.SIGINT)
    else:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    message = err[err.index("interrupted; saved: "):].splitlines()
    assert len(message) == 2 and f"{run / 'checkpoints'}/step-0000" in message[0]
    command = shlex.split(message[1])
    assert command[:3] == ["align", "sft", str(TINY)] and command[-1] == "resume_from=latest"
    again = run_cli(*command[1:])  # the command as printed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and (run / "checkpoints" / "step-000200").is_dir()
