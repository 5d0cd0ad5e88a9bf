"""Kernel profile of one eager decode step at DeepSeek-V2-Lite shape (random bf16 weights).

python bench/profile_decode.py [--batch 64] [--attend 384]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from align.generation.cache import LatentCache
from align.generation.forward import decode_logits
from align.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--attend", type=int, default=384)
    args = parser.parse_args()
    model = build_model("deepseek-v2-lite", dtype=torch.bfloat16, device_map="cuda").eval()
    cache = LatentCache.for_model(model.config, args.batch, args.attend, torch.bfloat16, "cuda")
    tokens = torch.randint(0, model.config.vocab_size, (args.batch,), device="cuda")
    positions = torch.full((args.batch,), args.attend // 2, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            decode_logits(model, cache, tokens, positions, args.attend)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode_logits(model, cache, tokens, positions, args.attend)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
