"""Without a GPU, Triton kernels run in Triton's interpreter (numpy), so they are checked on CPU too.

Set here, before any test module imports Triton (through torch or transformers): Triton decides at
import time whether its language functions are interpreted.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_sft_default(tmp_path_factory):
    """recipes/tiny_sft.yaml run once, unshortened, for every test of the recipes built on it (RL, ESFT):
    (run dir, stdout)."""
    from tests.test_cli import ROOT, run_cli

    run_dir = tmp_path_factory.mktemp("tiny_default") / "sft"
    sft = run_cli("sft", str(ROOT / "recipes" / "tiny_sft.yaml"), f"output.run_dir={run_dir}",
                  "output.progress=false", timeout=900)
    assert sft.returncode == 0, sft.stdout[-4000:] + sft.stderr[-4000:]
    return run_dir, sft.stdout
