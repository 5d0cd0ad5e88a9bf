"""Without a GPU, Triton kernels run in Triton's interpreter (numpy), so they are checked on CPU too.

Set here, before any test module imports Triton (through torch or transformers): Triton decides at
import time whether its language functions are interpreted.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
