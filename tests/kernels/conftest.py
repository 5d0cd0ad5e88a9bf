"""Without a GPU, Triton kernels run in Triton's interpreter (numpy), so they are checked on CPU too.

The interpreter mishandles bfloat16 loads, so CPU runs check float16/float32; GPU runs add bfloat16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")
