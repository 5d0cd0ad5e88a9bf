"""train.gradient_checkpointing (false / true / selective) and train.compile on the decoder layers:
equal losses and gradients, the activation memory each mode keeps, compiled layers matching eager."""

from __future__ import annotations

import pytest
import torch

from align.models import build_model
from align.models.model import DecoderLayer
from align.models.moe import RoutingTrace
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
    assert not compile_enabled("auto", "cpu", "rl") and compile_enabled("auto", "cuda", "rl")
    assert not compile_enabled("auto", "cpu", "rm") and not compile_enabled("auto", "cuda", "rm")
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


def test_a_routing_trace_adds_no_guards_to_compiled_layers():
    """A checkpointed compiled layer's recompute must run the graph its forward ran: what a RoutingTrace
    (GRPO's routing observation) records is written outside the graph, so calling again with the trace now
    holding the layer's routing compiles nothing new (a guard on it would: torch.utils.checkpoint's
    CheckpointError on the GPU, where the layer has no graph breaks)."""
    torch._dynamo.reset()
    layer, (x, cos, sin, mask) = layer_and_inputs()
    compiled = torch.compile(run_layer, backend="aot_eager")
    trace = RoutingTrace(own_choice=True)
    compiled(layer, False, x, cos, sin, mask, routing=trace)
    recorded = trace.layers[1].experts.clone()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(layer, False, x, cos, sin, mask, routing=trace)
    assert torch.equal(trace.layers[1].experts, recorded) and torch.equal(trace.own[1], recorded)


def kept_after_forward(layer, inputs) -> int:
    """CUDA bytes a training forward of layer leaves allocated beyond its outputs (what backward reads)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = layer(*inputs)
    torch.cuda.synchronize()
    outputs = sum(t.untyped_storage().nbytes() for t in out if isinstance(t, torch.Tensor))
    kept = torch.cuda.memory_allocated() - before - outputs
    out[0].float().sum().backward()
    return kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor and the bf16 Triton path need a GPU")
def test_compiled_full_checkpointing_keeps_what_eager_keeps_on_cuda():
    """train.compile with gradient_checkpointing true keeps only the layer input, as eager does (the
    checkpoint wraps the compiled layer): no more than eager's, far below the layer without checkpointing."""
    torch._dynamo.reset()
    layer, (x, cos, sin, mask) = layer_and_inputs(tokens=4096)
    layer = layer.to("cuda", torch.bfloat16)
    inputs = (x.detach().to("cuda", torch.bfloat16).requires_grad_(), cos.cuda(), sin.cuda(), mask)
    runner = compile_layer_runner(run_layer)
    kept = {}
    for name, mode, run in (("eager", True, None), ("compiled", True, runner), ("none", False, runner)):
        set_layer_forward(layer, mode, run)
        kept_after_forward(layer, inputs)  # compiles, warms the allocator
        kept[name] = kept_after_forward(layer, inputs)
    assert kept["compiled"] <= kept["eager"] + (1 << 20), kept
    assert kept["none"] > 4 * max(kept["compiled"], 1 << 20), kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor and the bf16 Triton path need a GPU")
def test_compiled_checkpointed_layers_with_a_routing_trace_on_cuda():
    """A RoutingTrace (GRPO's routing observation) passed through compiled, checkpointed layers: the
    recompute in backward runs the graph the forward ran (no CheckpointError), over two row lengths,
    with the loss and gradients of eager (bf16: the adapters' gradients as one vector, within 5%)."""
    torch._dynamo.reset()
    model = tiny_model(True, torch.bfloat16).cuda()
    runner = compile_layer_runner(run_layer)
    for length in (24, 40, 24):
        ids = torch.randint(0, 1024, (2, length), generator=torch.Generator().manual_seed(length)).cuda()
        results = []
        for run in (None, runner):
            set_layer_forward(model, True, run)
            model.zero_grad(set_to_none=True)
            trace = RoutingTrace(own_choice=True)
            with torch.autocast("cuda", torch.bfloat16):  # as the product's accelerator runs it (fp32 adapters)
                loss = model(ids, labels=ids, return_logits=False, routing=trace).loss
            loss.backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
            results.append((loss.detach().float(), grads, len(trace.layers)))
        (eager_loss, eager, eager_layers), (loss, compiled, layers) = results
        assert layers == eager_layers > 0
        torch.testing.assert_close(loss, eager_loss, rtol=2e-2, atol=0)
        assert (compiled - eager).norm() < 0.05 * eager.norm(), ((compiled - eager).norm(), eager.norm())


def graph_breaks_of_a_step(
    model, device: str, packed: bool, mode=True, backend: str = "inductor"
) -> tuple[dict, int]:
    """One training step of model with every decoder layer compiled (and checkpointed as mode says; true is
    `align sft`'s default): dynamo's graph-break reasons and the number of graphs it compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    set_layer_forward(model, mode, compile_layer_runner(run_layer, backend=backend))
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(2)).to(device)
    positions = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, 48).to(device) if packed else None
    with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        loss = model(ids, position_ids=positions, labels=ids, return_logits=False).loss
    loss.backward()
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor and the bf16 Triton / cuDNN paths need a GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["whole_rows", "packed"])
def test_compiled_layers_are_one_graph_each_on_cuda(packed):
    """Each compiled decoder layer (the dense one and the MoE ones; LoRA, bf16 under autocast) traces as one
    graph on the GPU paths: whole rows (cuDNN attention) and packed rows (varlen). A break inside a layer
    under full checkpointing once gave wrong adapter gradients (a cudnn.is_available() call in the
    attention dispatch)."""
    breaks, graphs = graph_breaks_of_a_step(tiny_model(True, torch.bfloat16).cuda(), "cuda", packed)
    assert not breaks, breaks
    assert graphs >= 2  # a dense layer and a MoE layer


def test_graph_break_count_sees_a_break(monkeypatch):
    """The counter the GPU test reads reports a break put inside the compiled layers (so that test can fail;
    the CPU's reference paths have breaks of their own, hence the comparison; not checkpointed: a break at
    the top of a checkpointed compiled layer makes its recompute differ, torch's CheckpointError)."""
    model = tiny_model(False, torch.float32)
    before, _ = graph_breaks_of_a_step(model, "cpu", packed=False, mode=False, backend="aot_eager")
    forward = DecoderLayer.forward

    def with_break(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", with_break)
    breaks, _ = graph_breaks_of_a_step(model, "cpu", packed=False, mode=False, backend="aot_eager")
    assert set(breaks) - set(before), (breaks, before)
