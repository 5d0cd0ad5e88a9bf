"""Split LoRA computes what peft's parametrized ParamWrapper computes, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora.layer import ParamWrapper

from align.kernels.grouped_mm import LowRank
from align.kernels.moe_experts import routed_experts
from align.models import build_model
from align.models.split_lora import AutocastLoraLinear, LoraLinear, SplitExperts, SplitLinear, split_adapters
from align.train.lora import apply_lora, lora_config


def pair(routed_experts: bool, seed: int = 3, r: int = 4):
    """(peft's own wrapping, align's split wrapping) of the same float64 tiny model and adapters."""
    model = build_model("tiny", seed=seed).double()
    config = lora_config(model, r=r, alpha=2.0 * r, routed_experts=routed_experts)
    reference = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters matter
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)
    split = apply_lora(model, config)
    split.load_state_dict(reference.state_dict())
    return reference, split


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits  # [B, S, V]
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    loss = (logits.double() * probe.to(logits.device)).mean()  # well-conditioned gradients in any dtype
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("routed_experts", [False, True])
def test_split_equals_peft_forward_and_backward(routed_experts):
    reference, split = pair(routed_experts)
    kinds = {type(m) for m in split.modules()}
    assert SplitLinear in kinds and (SplitExperts in kinds) == routed_experts
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    want_logits, want_grads = loss_and_grads(reference.train(), ids)
    got_logits, got_grads = loss_and_grads(split.train(), ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_disabled_adapters_give_the_base_model():
    reference, split = pair(routed_experts=True)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), split.disable_adapter():
        off = split(input_ids=ids).logits
        base = split.get_base_model()
    with torch.no_grad(), reference.disable_adapter():
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(off, want)
    assert base is not None


def test_saved_state_is_peft_state():
    reference, split = pair(routed_experts=True)
    assert split.state_dict().keys() == reference.state_dict().keys()


def test_only_align_models_are_converted():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1,
    )
    peer = DeepseekV2ForCausalLM(config)
    wrapped = apply_lora(peer, lora_config(peer, r=2, routed_experts=True))
    assert not any(isinstance(m, SplitLinear | SplitExperts | AutocastLoraLinear) for m in wrapped.modules())
    assert any(type(m) is ParamWrapper for m in wrapped.modules())
    assert split_adapters(wrapped) == 0


def test_attention_adapters_share_their_input_under_autocast():
    """Under autocast the attention adapters take x as it is (autocast casts for the GEMM): same loss
    and gradients as peft's cast to the float32 adapter, and fewer bytes kept for backward (q_proj and
    kv_a_proj_with_mqa keep the one normed input, not a copy each)."""
    from align.train.activation_memory import retained_bytes

    model = build_model("tiny", seed=2, dtype=torch.bfloat16)
    wrapped = apply_lora(model, lora_config(model, r=4))
    adapted = [m for m in wrapped.modules() if type(m) is AutocastLoraLinear]
    assert adapted and all(m.lora_A["default"].weight.dtype == torch.float32 for m in adapted)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return wrapped(input_ids=ids).logits.float().square().mean()

    kept, loss = retained_bytes(forward)
    grads = torch.autograd.grad(loss, [p for p in wrapped.parameters() if p.requires_grad])
    for m in adapted:
        m.__class__ = LoraLinear  # peft's own forward: x cast to float32, then back to bf16 by autocast
    kept_peft, loss_peft = retained_bytes(forward)
    grads_peft = torch.autograd.grad(loss_peft, [p for p in wrapped.parameters() if p.requires_grad])
    assert kept < kept_peft
    torch.testing.assert_close(loss, loss_peft, rtol=0, atol=0)
    for a, b in zip(grads, grads_peft, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped GEMM path of the low-rank products needs CUDA")
def test_low_rank_expert_updates_bf16_on_gpu():
    """routed_experts with low-rank updates in bf16 on the GPU (torch._grouped_mm for the rank-r
    products), fixed routing, against W + scaling * B @ A materialised in float64 on the CPU."""
    gen = torch.Generator().manual_seed(4)
    tokens, hidden, inter, n_experts, k, r = 96, 64, 48, 8, 3, 8
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(n_experts, 2 * inter, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    down = torch.randn(n_experts, hidden, inter, generator=gen, dtype=torch.float64) / inter**0.5
    factors = {name: (torch.randn(n_experts, r, w.shape[2], generator=gen, dtype=torch.float64) / w.shape[2]**0.5,
                      torch.randn(n_experts, w.shape[1], r, generator=gen, dtype=torch.float64) / r**0.5)
               for name, w in (("gate_up_proj", gate_up), ("down_proj", down))}

    def run(device, dtype, materialise):
        leaves = {n: tuple(t.to(device, dtype).detach().clone().requires_grad_() for t in ab)
                  for n, ab in factors.items()}
        base = {"gate_up_proj": gate_up.to(device, dtype), "down_proj": down.to(device, dtype)}
        if materialise:
            stacks = {n: base[n] + 0.5 * leaves[n][1] @ leaves[n][0] for n in base}
            out = routed_experts(x.to(device, dtype), weights.to(device), experts.to(device), **stacks)
        else:
            updates = {n: (LowRank(*leaves[n], 0.5),) for n in base}
            out = routed_experts(x.to(device, dtype), weights.to(device, torch.float32), experts.to(device),
                                 base["gate_up_proj"], base["down_proj"], updates)
        out.double().pow(2).mean().backward()
        return out.detach().double().cpu(), {n: [t.grad.double().cpu() for t in ab] for n, ab in leaves.items()}

    want, want_grads = run("cpu", torch.float64, materialise=True)
    got, got_grads = run("cuda", torch.bfloat16, materialise=False)
    assert torch.linalg.norm(got - want) < 0.02 * torch.linalg.norm(want)
    for name, grads in want_grads.items():
        for ours, ref in zip(got_grads[name], grads, strict=True):
            assert torch.linalg.norm(ours - ref) < 0.05 * torch.linalg.norm(ref), name
