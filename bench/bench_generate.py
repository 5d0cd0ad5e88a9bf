"""Rollout generation throughput at DeepSeek-V2-Lite shape: align's engine vs transformers' generate.

python bench/bench_generate.py --out gen.json            # GPU: deepseek-v2-lite, random bf16 weights
python bench/bench_generate.py --smoke --out smoke.json  # CPU: tiny preset, seconds

Random prompts of --prompt-len tokens, --new-tokens new tokens per row without early stop
(no EOS), sampling at temperature 1 (top-k/top-p off), for each --batch. Reported per batch: wall
time including prefill, generated tokens/s, ms per decode step (wall / new tokens), the decode
step alone (graph replay vs eager, all rows live, at the final attention length), latent-cache
bytes per token and in total, peak memory. Then, in the same run and on the same weights (the
transformers model's parameters are our tensors, assigned, not copied), transformers'
DeepseekV2ForCausalLM.generate at --hf-batch with sdpa attention and its default dynamic cache.
A correctness probe compares our greedy tokens with the argmax of our own full forward, with the
Triton decode kernels and with their PyTorch references.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from align.generation import GenerationEngine, SamplingParams
from align.kernels.dispatch import use_triton
from align.models import build_model

BASELINE_EXPERTS = "grouped_mm"  # not the default per-expert loop: the peer at its best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab - 2, (batch, length), generator=gen).tolist()


COMPILE = False


def step_ms(engine: GenerationEngine, attend_len: int, max_new: int, reps: int) -> float:
    """Decode-step time with every slot live (state saved and restored around the timing)."""
    st, device = engine.state, engine.device
    saved = [t.clone() for t in (st.tokens, st.positions, st.counts, st.done)]
    st.done.fill_(False)
    st.positions.fill_(attend_len - 1)
    sampling = SamplingParams(1.0)  # the step draws its keyed noise itself (align.generation.sampling)
    with torch.no_grad():
        engine.run_step(attend_len, sampling, max_new)  # capture (graph mode) / warm-up
        for tensor, value in zip((st.tokens, st.positions, st.counts, st.done), saved, strict=True):
            tensor.copy_(value)
        st.done.fill_(False)
        st.positions.fill_(attend_len - 1)
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            st.counts.zero_()  # keep rows live and at the same position
            st.positions.fill_(attend_len - 1)
            engine.run_step(attend_len, sampling, max_new)
        sync(device)
        elapsed = time.perf_counter() - start
    for tensor, value in zip((st.tokens, st.positions, st.counts, st.done), saved, strict=True):
        tensor.copy_(value)
    return elapsed / reps * 1e3


def bench_ours(model, batch: int, prompt_len: int, new: int, reps: int, device: torch.device) -> dict:
    engine = GenerationEngine(model, max_batch=batch, compile=COMPILE)
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size, seed=batch)
    kwargs = {"max_new_tokens": new, "temperature": 1.0, "seed": 0}
    engine.generate(prompts, **kwargs)  # warm-up: allocates buffers, captures the graphs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    results = engine.generate(prompts, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    assert all(len(c.token_ids) == new for row in results for c in row), "a row stopped early"
    attend_len = engine.cache.max_len
    graph_ms = step_ms(engine, attend_len, new, reps)
    eager = engine.graphs.enabled
    engine.graphs.enabled = False
    eager_ms = step_ms(engine, attend_len, new, reps)
    engine.graphs.enabled = eager
    out = {
        "batch": batch, "wall_s": wall, "tokens_per_s": batch * new / wall, "ms_per_step": wall / new * 1e3,
        "decode_step_ms": graph_ms if eager else None, "decode_step_ms_eager": eager_ms,
        "cuda_graphs": bool(eager), "cache_bytes_per_token": engine.cache_bytes_per_token(),
        "cache_bytes_total": engine.cache.nbytes(), "attend_len": attend_len,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    engine.release()
    return out


def greedy_probe(model, prompt_len: int, new: int, device: torch.device) -> dict:
    """Our greedy tokens vs argmax of our own full forward over the same sequence, with the Triton
    decode kernels and with their PyTorch references (ALIGN_TRITON=0), the same prompts."""
    prompts = random_prompts(4, prompt_len, model.config.vocab_size, seed=99)
    result = {}
    for name, enabled in (("triton", True), ("pytorch", False)):
        with use_triton(enabled):
            engine = GenerationEngine(model, max_batch=4)
            results = engine.generate(prompts, max_new_tokens=new, temperature=0)
            engine.release()
        agree, errors = 0, []
        for prompt, [completion] in zip(prompts, results, strict=True):
            ids = torch.tensor([prompt + completion.token_ids], device=device)
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            agree += sum(a == b for a, b in zip(logits.argmax(-1).tolist(), completion.token_ids, strict=True))
            chosen = torch.tensor(completion.token_ids, device=device)[:, None]
            expected = logits.log_softmax(-1).gather(1, chosen)[:, 0].cpu()
            errors.append((expected - torch.tensor(completion.logprobs)).abs())
        errors = torch.cat(errors)
        result[name] = {
            "tokens": errors.numel(), "argmax_agreement": agree / errors.numel(),
            "max_abs_logprob_diff": errors.max().item(), "mean_abs_logprob_diff": errors.mean().item(),
        }
    return result


def transformers_twin(model):
    """transformers' DeepseekV2ForCausalLM whose parameters ARE our model's tensors (no copy)."""
    from transformers import DeepseekV2ForCausalLM as Reference
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        twin = Reference._from_config(config, dtype=model.dtype)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    device = model.lm_head.weight.device
    twin.model.rotary_emb = DeepseekV2RotaryEmbedding(config).to(device)  # non-persistent buffers
    twin.set_experts_implementation(BASELINE_EXPERTS)  # transformers' best built-in experts path
    meta = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers twin has tensors left on the meta device: {meta[:5]}")
    return twin.eval()


def bench_transformers(model, batch: int, prompt_len: int, new: int, device: torch.device) -> dict:
    twin = transformers_twin(model)
    ids = torch.tensor(random_prompts(batch, prompt_len, model.config.vocab_size, seed=batch), device=device)
    kwargs = {
        "attention_mask": torch.ones_like(ids), "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        "min_new_tokens": new, "pad_token_id": 0,
    }
    with torch.no_grad():
        twin.generate(ids, max_new_tokens=4, **{**kwargs, "min_new_tokens": 4})  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        out = twin.generate(ids, max_new_tokens=new, **kwargs)
        sync(device)
    wall = time.perf_counter() - start
    assert out.shape[1] == prompt_len + new
    return {
        "batch": batch, "wall_s": wall, "tokens_per_s": batch * new / wall, "ms_per_step": wall / new * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, small sizes")
    parser.add_argument("--batch", type=int, action="append", help="batch size(s) for ours (default 64, 256)")
    parser.add_argument("--hf-batch", type=int, default=None, help="transformers batch (default 64; 0 = skip)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--step-reps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = parser.parse_args()
    global COMPILE
    COMPILE = args.compile

    if args.smoke:
        preset, dtype, device = "tiny", torch.float32, torch.device("cpu")
        batches, hf_batch, prompt_len, new = args.batch or [4, 8], 4, 16, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        preset, dtype, device = "deepseek-v2-lite", torch.bfloat16, torch.device("cuda")
        batches, hf_batch, prompt_len, new = args.batch or [64, 256], 64, 128, 256
    hf_batch = hf_batch if args.hf_batch is None else args.hf_batch
    prompt_len, new = args.prompt_len or prompt_len, args.new_tokens or new

    model = build_model(preset, dtype=dtype, device_map=str(device)).eval()
    result = {
        "preset": preset, "dtype": str(dtype), "prompt_len": prompt_len, "new_tokens": new,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    import transformers

    result["transformers"] = transformers.__version__
    result["compile"] = args.compile
    result["baseline_experts"] = BASELINE_EXPERTS
    result["greedy_probe"] = greedy_probe(model, prompt_len, min(new, 32), device)
    print(json.dumps(result["greedy_probe"]), flush=True)
    result["ours"] = []
    for batch in batches:
        result["ours"].append(bench_ours(model, batch, prompt_len, new, args.step_reps, device))
        print(json.dumps(result["ours"][-1]), flush=True)
    if hf_batch:
        result["transformers_generate"] = bench_transformers(model, hf_batch, prompt_len, new, device)
        print(json.dumps(result["transformers_generate"]), flush=True)
        same = [r for r in result["ours"] if r["batch"] == hf_batch]
        if same:
            result["speedup_same_batch"] = same[0]["tokens_per_s"] / result["transformers_generate"]["tokens_per_s"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
