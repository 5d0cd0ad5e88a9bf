"""recipes/tiny_esft.yaml end to end, unshortened, on the tiny SFT model (the session's run of
recipes/tiny_sft.yaml, conftest.py): the CLI scores the experts, writes esft_experts.json, trains only the
chosen experts (held-out exact match rises over the base's), and writes a full hub-layout final/ that equals
the base bit for bit outside the chosen experts. About 30 s on 2 CPU cores past the shared SFT run."""

from __future__ import annotations

import pytest
import torch

from align.models import DeepseekV2ForCausalLM
from align.train.esft import EXPERTS_FILE, read_choice
from align.train.metrics import read_metrics
from tests.test_cli import ROOT, run_cli


@pytest.fixture(scope="module")
def esft_run(tiny_sft_default):
    sft_dir, _ = tiny_sft_default
    run_dir = sft_dir.parent / "esft"
    result = run_cli("sft", str(ROOT / "recipes" / "tiny_esft.yaml"), f"model.path={sft_dir / 'final'}",
                     f"output.run_dir={run_dir}", "output.progress=false", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return sft_dir, run_dir, result.stdout


def final_exact_match(run_dir) -> float:
    return [r["eval/exact_match"] for r in read_metrics(run_dir) if "eval/exact_match" in r][-1]


def test_esft_improves_on_its_base(esft_run):
    sft_dir, run_dir, out = esft_run
    choice = read_choice(run_dir / EXPERTS_FILE)
    assert choice.score == "gate" and choice.top_p == 0.2 and choice.tokens >= 16384
    assert set(choice.layers) == {1, 2} and all(1 <= len(ids) < 8 for ids in choice.layers.values())
    assert "ESFT: " in out and "trainable parameters: " in out
    base, tuned = final_exact_match(sft_dir), final_exact_match(run_dir)
    assert tuned >= base + 0.05, (base, tuned)  # measured: 77.0% -> 86.0% (2 threads)
    assert f"eval exact match: {tuned:.1%}" in out


def test_final_is_the_base_outside_the_chosen_experts(esft_run):
    sft_dir, run_dir, _ = esft_run
    choice = read_choice(run_dir / EXPERTS_FILE)
    base = DeepseekV2ForCausalLM.from_pretrained(sft_dir / "final", dtype="float32").state_dict()
    final = DeepseekV2ForCausalLM.from_pretrained(run_dir / "final", dtype="float32").state_dict()
    assert set(final) == set(base)
    for key, tensor in base.items():
        if ".mlp.experts." not in key:
            assert torch.equal(final[key], tensor), key
            continue
        rows = torch.ones(tensor.shape[0], dtype=torch.bool)
        rows[choice.layers[int(key.split(".")[2])]] = False
        assert torch.equal(final[key][rows], tensor[rows]), key
        assert not torch.equal(final[key][~rows], tensor[~rows]), key
    assert (run_dir / "checkpoints" / "step-000300" / "esft" / "trainable.safetensors").is_file()
