"""Benchmark entry points (issues 14, 19) run end to end at their CPU smoke size (the GPU numbers come from the
same code: bench/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=600)


def test_profile_rl_generation_smoke(tmp_path):
    out = tmp_path / "profile.json"
    run("profile_rl_generation.py", "--smoke", "--out", str(out), "--mean-len", "6", "--compact", "on")
    result = json.loads(out.read_text())
    [step] = result["steps"]
    assert step["decode_steps"] == len(step["steps"]) > 0 and step["generated_tokens"] > 0
    assert step["engine"]["compact"] and min(row["width"] for row in step["steps"]) < result["rollout_batch"]
    assert step["prefill"]["passes"] >= 1 and step["time/update"] > 0


def test_bench_grpo_variable_lengths_smoke(tmp_path):
    out = tmp_path / "grpo.json"
    run("bench_grpo.py", "--smoke", "--skip-trl", "--lengths", "variable", "--completion-len", "24",
        "--mean-len", "10", "--out", str(out))
    variable = json.loads(out.read_text())["align"]["variable"]
    assert 0 < variable["ratio"] and variable["fixed_length"] == round(variable["lengths"]["mean"])
    assert variable["lengths"]["max"] <= 24 and variable["lengths"]["min"] < variable["lengths"]["max"]


def test_bench_sft_long_rows_full_finetuning_smoke(tmp_path):
    """bench_sft's issue-14 modes: rows of one long document each (unpacked), full fine-tuning of a
    layer slice, micro_batch_size auto; the product's own `align sft` runs them."""
    out = tmp_path / "sft.json"
    run("bench_sft.py", "--smoke", "--rows", "long", "--full", "--layers", "2", "--align-only", "--micro", "auto",
        "--batch-size", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["rows"] == "long" and result["full_finetuning"] and result["lora"] is None
    assert result["layers"] == 2 and result["align_tokens_per_s"] > 0 and result["micro_batch"] == "auto"
    assert result["documents"]["min"] == result["documents"]["max"] == result["max_length"] == 256
    assert "align_unpacked" not in result and "trl" not in result


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "attention.json"
    run("bench_attention.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    for rows in result["lengths"].values():
        assert set(rows) == {"product", "sdpa_math"}
        for row in rows.values():
            assert row["forward_s"] > 0 and row["forward_backward_s"] > 0 and row["max_rel_error_first_512"] < 1e-4


def test_bench_sft_times_transformers_with_and_without_checkpointing(tmp_path):
    """The peer at its best: transformers + peft with and without checkpointing, align against the faster."""
    out = tmp_path / "sft.json"
    run("bench_sft.py", "--smoke", "--skip-trl", "--skip-unpacked", "--peer-micro", "3", "--out", str(out))
    result = json.loads(out.read_text())
    runs = [result["transformers"], result["transformers_checkpointing_false"]]
    assert [r["gradient_checkpointing"] for r in runs] == [True, False] and {r["micro_batch"] for r in runs} == {3}
    fastest = max(r["tokens_per_s"] for r in runs)
    assert result["fastest_transformers"]["tokens_per_s"] == fastest
    assert result["speedup_vs_fastest_transformers"] == result["align_tokens_per_s"] / fastest
