"""Kernel tests run on the GPU when there is one, else in Triton's interpreter (tests/conftest.py).

The interpreter mishandles bfloat16 loads, so CPU runs check float16/float32; GPU runs add bfloat16.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")
