"""The model a run trains, in one object per mode: `FullSetup` (every weight), `LoRASetup` (adapters on
a frozen base) and `ESFTSetup` (the routed experts the task uses, align/train/esft.py). Loops ask the
setup instead of testing the mode: `save` (the weights of a checkpoint), `final_state` / `final_model`
(<run_dir>/final), `unwrapped`, `grad_sync`, `reference` (the starting weights, for a frozen pass).

Processes: one ('single'), DDP over a replicated model, or FSDP2 (`fully_shard` per decoder layer, full
fine-tuning only); `train.distributed=auto` picks the mode's own (`auto_distribution`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator

from align.models.config import moe_layers
from align.recipe import RecipeBase
from align.train import checkpointing as ckpt
from align.train import esft
from align.train.activation_checkpointing import run_layer, set_layer_forward
from align.train.lora import apply_lora, lora_config, trainable_summary
from align.train.optim import build_optimizer, build_scheduler
from align.train.regional_compile import compile_enabled, compile_layer_runner


def load_base_model(recipe: RecipeBase, device: torch.device, full_checkpoint: Path | None = None):
    """The model to train: a full-FT checkpoint being resumed, a local directory, or a preset."""
    from align.models import DeepseekV2ForCausalLM, build_model

    m = recipe.model
    if recipe.MODEL_HEAD == "score":
        model = load_score_model(recipe, device, full_checkpoint)
    elif full_checkpoint is not None:
        model = DeepseekV2ForCausalLM.from_pretrained(full_checkpoint, dtype=m.dtype, device_map=device)
    elif m.path is not None:
        model = DeepseekV2ForCausalLM.from_pretrained(m.path, dtype=m.dtype, device_map=device)
    else:
        seed = recipe.train.seed if m.seed is None else m.seed
        model = build_model(m.preset, dtype=m.dtype, device_map=device, seed=seed, **m.config)
    if recipe.train.aux_loss_alpha is not None:
        set_aux_loss_alpha(model, recipe.train.aux_loss_alpha)
    return model.train()


def load_score_model(recipe: RecipeBase, device: torch.device, full_checkpoint: Path | None = None):
    """A reward model: a checkpoint being resumed or a sequence-classification `model.path` as it is, a
    causal-LM `model.path` (an SFT output) or a preset with a fresh score head."""
    from align.models import DeepseekV2ForSequenceClassification as Scorer
    from align.models.sequence_classification import is_score_checkpoint

    m, seed = recipe.model, recipe.train.seed if recipe.model.seed is None else recipe.model.seed
    path = full_checkpoint if full_checkpoint is not None else m.path
    if path is not None and is_score_checkpoint(path):
        return Scorer.from_pretrained(path, dtype=m.dtype, device_map=device)
    if path is not None:
        return Scorer.from_causal_lm(path, dtype=m.dtype, device_map=device, seed=seed)
    from align.models.checkpoint import empty_model, resolve_dtype
    from align.models.presets import preset_config

    config = preset_config(m.preset, **m.config)  # a preset: random backbone and head
    config.num_labels = 1  # one scalar reward (transformers' configs default to 2 labels)
    model = empty_model(Scorer, config, resolve_dtype(m.dtype, config), device)
    with torch.random.fork_rng(devices=[]):
        model.reset_parameters(seed)
    return model


def set_aux_loss_alpha(model: torch.nn.Module, alpha: float) -> None:
    """The MoE balance-loss coefficient, in the config (saved with checkpoints) and every MoE layer."""
    model.config.aux_loss_alpha = alpha
    for module in model.modules():
        if hasattr(module, "aux_alpha"):
            module.aux_alpha = float(alpha)


def unwrap(model, accelerator: Accelerator):
    """The module without DDP (FSDP2 modules are used as they are)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False) if hasattr(model, "module") else model


@dataclass
class Setup:
    """The trained model, its optimizer and schedule, and how it is spread over processes."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    distribution: str  # 'single' | 'ddp' | 'fsdp'
    accelerator: Accelerator
    resume: Path | None
    start_step: int = 0
    head: torch.nn.Module | None = None  # the LM head when the loss may use it outside the forward
    trainer_state: dict = field(default_factory=dict)  # of the checkpoint resumed (counters to carry on)

    mode: ClassVar[str]  # "full" | "lora" | "esft"
    label: ClassVar[str]  # the mode's name in messages
    auto_distribution: ClassVar[str]  # with more than one process and train.distributed=auto

    @classmethod
    def distribution_for(cls, requested: str, accelerator: Accelerator) -> str:
        if accelerator.num_processes == 1:
            return "single"
        if requested == "fsdp" and cls.auto_distribution != "fsdp":
            raise ValueError(f"train.distributed=fsdp is for full fine-tuning; {cls.label} runs use ddp (or auto)")
        return cls.auto_distribution if requested == "auto" else requested

    @staticmethod
    def load(recipe: RecipeBase, tokenizer, accelerator: Accelerator, resume: Path | None, task=None) -> tuple:
        """(the model to train, extra Setup fields), restored from checkpoint `resume` when given. task: the
        training rows (`train`, `tokens`, `collate`, as sft.SFTData), for a mode that looks at them (ESFT)."""
        raise NotImplementedError

    @property
    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.model, self.accelerator)

    @property
    def sharded(self) -> bool:
        return self.distribution == "fsdp"

    @contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on the non-final micro-batches of a step."""
        if enabled or self.distribution == "single":
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.model.no_sync():
                yield

    @contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Every weight whole on this process for the duration: for the rollout engine and greedy eval, which
        call the model's modules outside FSDP's forward. FSDP2 gathers each sharded module's parameters
        (unshard; kept through forwards run meanwhile) and frees them after (reshard): one replica of the
        weights per process while it lasts. DDP and one process hold them whole already."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        root = self.model
        layers = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
        # before any forward (the first rollout), a layer's forward would make that layer FSDP's root: settle
        # the root as its first forward does (torch 2.13 has no public call for it)
        root._get_fsdp_state()._lazy_init()
        for module in layers:
            module.set_reshard_after_forward(False, recurse=False)
        for module in [root, *layers]:
            module.unshard()
        try:
            yield
        finally:
            for module in [root, *layers]:
                module.reshard()
            for module in layers:
                module.set_reshard_after_forward(True, recurse=False)

    def save(self, out: Path, tokenizer) -> None:
        """The weights (+ tokenizer) of a checkpoint, into its temporary directory `out`; every process calls it."""
        raise NotImplementedError

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """Every process calls it: the state dict <run_dir>/final is saved with (None: the model's own)."""
        raise NotImplementedError

    def final_model(self) -> torch.nn.Module:
        """The main process saves <run_dir>/final from it; call it last (LoRA merges in place)."""
        raise NotImplementedError

    def keep_reference(self, recipe: RecipeBase) -> None:
        """Hold what `reference` needs, before the first update."""

    def reference(self) -> AbstractContextManager[torch.nn.Module]:
        """A module holding the starting weights, for forwards without gradient."""
        raise NotImplementedError


@dataclass
class FullSetup(Setup):
    """Full fine-tuning: every weight trains; checkpoints hold the whole model."""

    frozen: torch.nn.Module | None = None  # the starting weights (`keep_reference`)

    mode: ClassVar[str] = "full"
    label: ClassVar[str] = "full fine-tuning"
    auto_distribution: ClassVar[str] = "fsdp"

    @staticmethod
    def load(recipe: RecipeBase, tokenizer, accelerator: Accelerator, resume: Path | None, task=None) -> tuple:
        return load_base_model(recipe, accelerator.device, resume / "model" if resume is not None else None), {}

    def save(self, out: Path, tokenizer) -> None:
        state = ckpt.full_state_dict(self.model, self.sharded)
        if self.accelerator.is_main_process:
            self.unwrapped.save_pretrained(out / "model", state_dict=state)
            tokenizer.save_pretrained(out / "model")

    def final_state(self) -> dict[str, torch.Tensor]:
        return ckpt.full_state_dict(self.model, self.sharded)

    def final_model(self) -> torch.nn.Module:
        return self.unwrapped

    def keep_reference(self, recipe: RecipeBase) -> None:
        """A frozen copy of the starting weights (a resumed run reloads them from the recipe's model); sharded
        as the policy is under FSDP, so no process holds it whole."""
        device = self.accelerator.device
        if self.sharded:
            start = wrap_model(load_base_model(recipe, device), "fsdp", self.accelerator)
        else:
            start = load_base_model(recipe, device) if self.resume is not None else copy.deepcopy(self.model)
        self.frozen = start.eval().requires_grad_(False)

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        if self.frozen is None:
            raise RuntimeError("FullSetup.reference: call keep_reference before training starts")
        yield self.frozen
        if self.sharded:  # its root stays gathered after a forward (wrap_model); no backward reshards it
            self.frozen.reshard()


@dataclass
class LoRASetup(Setup):
    """LoRA: adapters train on a frozen base; checkpoints hold the adapter, which names its base."""

    base_ref: str | None = None  # directory of the frozen base the adapter applies to

    mode: ClassVar[str] = "lora"
    label: ClassVar[str] = "LoRA"
    auto_distribution: ClassVar[str] = "ddp"

    @staticmethod
    def load(recipe: RecipeBase, tokenizer, accelerator: Accelerator, resume: Path | None, task=None) -> tuple:
        model = load_base_model(recipe, accelerator.device)
        base_ref = base_reference(recipe, model, tokenizer, accelerator)
        lo = recipe.lora
        config = lora_config(model, lo.r, lo.alpha, lo.dropout, lo.targets, lo.routed_experts)
        if recipe.MODEL_HEAD == "score":  # the fresh score head trains in full beside the adapters
            config.modules_to_save = ["score"]
        model = apply_lora(model, config)
        if resume is not None:
            ckpt.load_adapter_weights(model, resume / "adapter")
        return model, {"base_ref": base_ref}

    def save(self, out: Path, tokenizer) -> None:
        if self.accelerator.is_main_process:
            ckpt.save_adapter(self.unwrapped, out / "adapter", self.base_ref)
            tokenizer.save_pretrained(out / "adapter")

    def final_state(self) -> None:
        return None

    def final_model(self) -> torch.nn.Module:
        return self.unwrapped.merge_and_unload()

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The live model with its adapters disabled: the base."""
        with self.unwrapped.disable_adapter():
            yield self.unwrapped  # not DDP's wrapper: a forward without gradient needs no gradient sync


@dataclass
class ESFTSetup(FullSetup):
    """ESFT: only the chosen routed experts' slices train (align/models/expert_slices.py: parameters of their
    own, written back into the frozen stacked tensors after every optimizer step). Step checkpoints hold the
    trained tensors and esft_experts.json (resume loads the recipe's base and reuses the choice, never
    rescoring); <run_dir>/final is the full hub layout, bit-identical to the base outside the chosen experts."""

    sliced: list = field(default_factory=list)  # the SlicedExperts modules
    experts_path: Path | None = None  # <run_dir>/esft_experts.json

    mode: ClassVar[str] = "esft"
    label: ClassVar[str] = "ESFT"
    auto_distribution: ClassVar[str] = "ddp"
    STATE_DIR: ClassVar[str] = "esft"
    TENSORS: ClassVar[str] = "trainable.safetensors"

    def __post_init__(self) -> None:
        self.optimizer.register_step_post_hook(lambda *_: self.sync())

    def sync(self) -> None:
        for module in self.sliced:
            module.sync_()

    @staticmethod
    def load(recipe: RecipeBase, tokenizer, accelerator: Accelerator, resume: Path | None, task=None) -> tuple:
        model = load_base_model(recipe, accelerator.device)
        choice = esft_choice(recipe, model, task, accelerator, resume)
        if accelerator.is_main_process:
            print(choice.summary(model.config.n_routed_experts), flush=True)
        e = recipe.esft
        sliced = esft.freeze_for_esft(model, choice, e.train_shared_experts, e.train_non_expert_modules)
        if resume is not None:
            load_tensors(model, resume / ESFTSetup.STATE_DIR / ESFTSetup.TENSORS)
            for module in sliced:
                module.sync_()
        return model, {"sliced": sliced, "experts_path": Path(recipe.output.run_dir) / esft.EXPERTS_FILE}

    def save(self, out: Path, tokenizer) -> None:
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            state = out / self.STATE_DIR
            state.mkdir()
            tensors = {k: v.cpu().contiguous() for k, v in esft.tuned_state(self.unwrapped).items()}
            save_file(tensors, str(state / self.TENSORS))
            (state / esft.EXPERTS_FILE).write_text(self.experts_path.read_text(encoding="utf-8"), encoding="utf-8")
            tokenizer.save_pretrained(state)

    def final_state(self) -> dict[str, torch.Tensor]:
        return esft.base_state(self.unwrapped)


def esft_choice(recipe: RecipeBase, model, task, accelerator: Accelerator, resume: Path | None) -> esft.Choice:
    """The experts to train: a resumed run's from its checkpoint, else from the scoring pass (all processes);
    the main process writes <run_dir>/esft_experts.json and every process reads it back."""
    e, path = recipe.esft, Path(recipe.output.run_dir) / esft.EXPERTS_FILE
    if resume is not None:
        choice = esft.read_choice(resume / ESFTSetup.STATE_DIR / esft.EXPERTS_FILE)
    else:
        if task is None:
            raise ValueError("esft: the scoring pass needs the training rows (this loop does not pass them)")
        sums, samples, tokens = esft.score_experts(model, task, e.sample_tokens, recipe.train.seed,
                                                   recipe.eval.batch_size, accelerator, recipe.output.progress)
        choice = esft.choose(sums, moe_layers(model.config), e.score, e.top_p, samples, tokens)
    if accelerator.is_main_process:
        esft.write_choice(choice, path)
    accelerator.wait_for_everyone()
    return esft.read_choice(path)


def load_tensors(model: torch.nn.Module, path: Path) -> None:
    """The trained tensors of a step checkpoint into the model's trainable parameters (all of them)."""
    from safetensors.torch import load_file

    from align.models.checkpoint import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the ESFT checkpoint is incomplete")
    saved, params = load_file(str(path)), dict(model.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    if set(saved) != trainable:
        raise CheckpointError(f"{path}: holds {sorted(set(saved) ^ trainable)[:6]} that this recipe's "
                              f"trained parameters do not (or the reverse); resume with the recipe that wrote it")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def base_reference(recipe: RecipeBase, model, tokenizer, accelerator: Accelerator) -> str:
    """Directory of the frozen base a LoRA adapter applies to; a preset base is saved to <run_dir>/base."""
    if recipe.model.path is not None:
        return str(Path(recipe.model.path).resolve())
    base = Path(recipe.output.run_dir) / "base"
    if accelerator.is_main_process and not (base / "config.json").is_file():
        with ckpt.atomic_dir(base, _Solo()) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return str(base.resolve())


class _Solo:
    """The atomic_dir protocol for a write done by one process alone."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def wrap_model(model, distribution: str, accelerator: Accelerator):
    """Move to the device and wrap for data parallelism: DDP (accelerate) or FSDP2 (fully_shard)."""
    model = model.to(accelerator.device)
    if distribution == "ddp":
        return accelerator.prepare_model(model)
    if distribution == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        # the root's own weights (embeddings, norm, head) stay gathered from forward to backward: GRPO applies
        # the head outside the forward (the fused log-prob kernel), and backward needs them again first thing
        fully_shard(model, reshard_after_forward=False)
    return model


def loss_head(model, distribution: str, accelerator: Accelerator):
    """The output Linear for the trained-positions-only loss: one process, or DDP with a frozen head
    (FSDP shards it, and DDP expects trained parameters to be used inside its forward)."""
    head = unwrap(model, accelerator).get_output_embeddings()
    if head is None:  # a score head (reward model): no LM head
        return None
    if distribution == "single" or (distribution == "ddp" and not head.weight.requires_grad):
        return head
    return None


def check_resume_position(resume: Path, run_steps: int, rows_per_step: int) -> None:
    """The checkpoint's step fits in this run, and it took as many rows per step as this run will."""
    state = ckpt.read_trainer_state(resume)
    if state["step"] > run_steps:
        raise ValueError(
            f"resume_from {resume}: the checkpoint is at step {state['step']}, beyond this recipe's {run_steps} "
            f"steps; set train.steps to at least {state['step']} to continue it"
        )
    if state["step"] and state.get("rows_consumed") != state["step"] * rows_per_step:
        raise ValueError(
            f"resume_from {resume}: it was trained with {state.get('rows_consumed', 0) // state['step']} rows per "
            f"step, this run has {rows_per_step}; keep micro_batch_size x grad_accum x processes equal"
        )


def set_layer_modes(model: torch.nn.Module, train, device: torch.device, loop: str) -> None:
    """train.gradient_checkpointing and train.compile on every decoder layer (before any DDP / FSDP wrapping)."""
    runner = compile_layer_runner(run_layer) if compile_enabled(train.compile, device, loop) else None
    set_layer_forward(model, train.gradient_checkpointing, runner)


def setup_kind(recipe: RecipeBase) -> type[Setup]:
    if getattr(recipe, "esft", None) is not None:
        return ESFTSetup
    return FullSetup if recipe.lora is None else LoRASetup


def setup_model(
    recipe: RecipeBase, tokenizer, accelerator: Accelerator, steps: int, rows_per_step: int, say,
    resume: Path | None, run_steps: int | None = None, task=None,
) -> Setup:
    """Model (+LoRA / ESFT), wrapping, optimizer, scheduler; restored from checkpoint `resume` when given.
    run_steps: the steps of the run as checkpoints count them (default `steps`, the optimizer steps).
    task: the training rows, for a mode that looks at them (ESFT's scoring pass)."""
    if resume is not None:
        check_resume_position(resume, run_steps or steps, rows_per_step)
    kind = setup_kind(recipe)
    model, extra = kind.load(recipe, tokenizer, accelerator, resume, task)
    set_layer_modes(model, recipe.train, accelerator.device, recipe.LOOP)
    say(trainable_summary(model))
    distribution = kind.distribution_for(recipe.train.distributed, accelerator)
    model = wrap_model(model, distribution, accelerator)
    o, s = recipe.optim, recipe.schedule
    optimizer = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay)
    scheduler = build_scheduler(optimizer, s.name, steps, s.warmup_steps, s.min_lr_ratio, s.step_at, s.step_factor)
    setup = kind(model, optimizer, scheduler, distribution, accelerator, resume,
                 head=loss_head(model, distribution, accelerator), **extra)
    if resume is not None:
        state = ckpt.restore_training_state(resume, model, optimizer, scheduler, accelerator)
        setup.start_step, setup.trainer_state = state["step"], state
        say(f"resumed from {resume} at step {setup.start_step}")
    return setup
