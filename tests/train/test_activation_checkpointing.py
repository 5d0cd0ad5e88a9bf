"""train.gradient_checkpointing (false / true / selective) and train.compile on the decoder layers:
equal losses and gradients, the activation memory each mode keeps, compiled layers matching eager."""

from __future__ import annotations

import pytest
import torch

from align.models import build_model
from align.models.model import DecoderLayer
from align.models.presets import preset_config
from align.models.rope import RotaryEmbedding
from align.train.activation_checkpointing import run_layer, set_layer_forward
from align.train.activation_memory import retained_bytes, saved_bytes
from align.train.lora import apply_lora, lora_config
from align.train.regional_compile import compile_enabled, compile_layer_runner

MODES = (False, True, "selective")


def tiny_model(lora: bool, dtype=torch.float64):
    model = build_model("tiny", dtype=dtype, seed=0).train()
    if lora:
        model = apply_lora(model, lora_config(model, r=4, alpha=8, routed_experts=True))
        with torch.no_grad():  # B starts at zero: give it values so every adapter gradient is non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def loss_and_grads(model, mode, runner=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_layer_forward(model, mode, runner)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two packed documents
    model.zero_grad(set_to_none=True)
    loss = model(ids, position_ids=positions, labels=ids, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_modes_give_equal_loss_and_gradients(lora):
    model = tiny_model(lora)
    loss, grads = loss_and_grads(model, False)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for mode in (True, "selective"):
        other_loss, other = loss_and_grads(model, mode)
        torch.testing.assert_close(other_loss, loss, rtol=1e-12, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(other[name], g, rtol=1e-10, atol=1e-14, msg=f"{mode}: {name}")


def test_without_gradient_the_layers_run_their_own_forward():
    model = tiny_model(False, torch.float32)
    set_layer_forward(model, "selective")
    ids = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        checked = model(ids).logits
    set_layer_forward(model, False)
    assert all("forward" not in layer.__dict__ for layer in model.modules() if isinstance(layer, DecoderLayer))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, checked, rtol=0, atol=0)


def layer_and_inputs(tokens: int = 64):
    config = preset_config("tiny")
    torch.manual_seed(0)
    layer = DecoderLayer(config, 1).train()  # a MoE layer
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.05)
    cos, sin = RotaryEmbedding(config)(torch.arange(tokens)[None])
    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    return layer, (x, cos, sin, None)


def test_selective_keeps_less_than_no_checkpointing_and_more_than_full():
    layer, inputs = layer_and_inputs()
    kept = {}
    for mode in MODES:
        set_layer_forward(layer, mode)
        kept[mode], out = retained_bytes(layer, *inputs)
        out[0].sum().backward()  # what was kept is enough for backward
    set_layer_forward(layer, False)
    hooked, _ = saved_bytes(layer, *inputs, exclude=[*inputs[:3], *layer.parameters()])
    assert kept[False] == hooked  # the count agrees with autograd's saved tensors where both apply
    assert kept[False] > kept["selective"] > kept[True] == 0
    assert kept["selective"] < 0.8 * kept[False]


def test_compile_enabled_auto_is_on_cuda_only_and_bools_are_as_set():
    assert not compile_enabled("auto", "cpu") and compile_enabled("auto", torch.device("cuda"))
    assert not compile_enabled("auto", "cpu", "rl") and not compile_enabled("auto", "cuda", "rl")
    assert compile_enabled(True, "cpu", "rl")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")
    with pytest.raises(ValueError, match=r"train.compile: expected one of 'auto', true, false, got 'yes'"):
        compile_enabled("yes", "cpu")


def test_compiled_layers_match_eager_under_each_checkpointing_mode():
    """aot_eager: the graphs dynamo captures and AOTAutograd's forward/backward split (where selective
    checkpointing is planned), without inductor's C++ build on the CPU."""
    torch._dynamo.reset()
    model = tiny_model(True, torch.float32)
    loss, grads = loss_and_grads(model, False)
    runner = compile_layer_runner(run_layer, backend="aot_eager")
    for mode in MODES:
        compiled_loss, compiled = loss_and_grads(model, mode, runner)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(compiled[name], g, rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
