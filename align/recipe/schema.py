"""The recipe sections of `align sft` and `align rl` (typed dataclasses; the rules are in loader.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from align.recipe.loader import (
    ANY,
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    RecipeError,
    ranged,
)

# ------------------------------------------------------------------------------------ SFT schema


@dataclass
class ModelSection:
    preset: str | None = None  # a named random-init shape (align.models.presets): tiny, deepseek-v2-lite
    path: str | None = None  # or a local Hugging Face checkpoint directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the weights
    seed: int | None = ranged(None, SEED)  # initialisation seed of a preset; null = train.seed
    config: dict[str, Any] = field(default_factory=dict)  # preset config overrides (e.g. num_hidden_layers)

    def validate(self, where: str) -> None:
        if (self.preset is None) == (self.path is None):
            raise RecipeError(f"{where}: set exactly one of 'model.preset' or 'model.path'")
        if self.config and self.path is not None:
            raise RecipeError(f"{where}: 'model.config' overrides apply to presets only, not 'model.path'")


@dataclass
class TokenizerSection:
    path: str | None = None  # 'tiny', a local tokenizer directory, or null = model.path (else 'tiny')
    chat_template: Literal["deepseek_v2"] | None = None  # replace the tokenizer's template


@dataclass
class SyntheticSection:
    """Arithmetic chats from data_tools.synthetic, written to <run_dir>/data/{train,test}.jsonl."""

    train: int = ranged(10000, AT_LEAST_1)
    test: int = ranged(200, AT_LEAST_1)
    seed: int = ranged(0, SEED)
    max_operand: int = ranged(99, AT_LEAST_1)
    ops: str = "+-"
    teacher_error: float = ranged(0.0, FRACTION)  # share of borrowing subtractions whose reply forgets the borrow
    replies_per_problem: int = ranged(1, AT_LEAST_1)  # training rows per problem, each its own teacher draw


@dataclass
class DataSourceSection:
    """Where rows come from (SFT and RL): files / dataset directories, or the synthetic task."""

    train: str | None = None  # JSONL / JSON / parquet file or dataset directory
    eval: str | None = None
    train_split: str | None = None  # split of a dataset directory (default 'train')
    eval_split: str | None = None
    synthetic: SyntheticSection | None = None  # instead of `train` / `eval`
    on_error: Literal["raise", "skip"] = "raise"  # a malformed row / line: stop naming it, or count and skip

    def validate(self, where: str) -> None:
        if (self.train is None) == (self.synthetic is None):
            raise RecipeError(f"{where}: set exactly one of 'data.train' or 'data.synthetic'")


@dataclass
class DataSection(DataSourceSection):
    eval_fraction: float = ranged(0.0, Range(0, 1, open_high=True))  # held-out share of train when no `eval`
    max_length: int = ranged(2048, Range(2))
    packing: bool = True  # best-fit packing into rows of `max_length` tokens
    train_on: Literal["assistant", "all"] = "assistant"
    truncation: Literal["right", "drop"] = "right"


@dataclass
class LoRASection:
    r: int = ranged(16, AT_LEAST_1)
    alpha: float = ranged(32.0, POSITIVE)
    dropout: float = ranged(0.0, Range(0, 1, open_high=True))  # only 0 with MLP / expert targets (peft)
    targets: list[str] | None = None  # null = DeepSeek-V2 defaults (align.train.lora.DEFAULT_TARGETS)
    routed_experts: bool = False  # also adapt the stacked routed-expert weights


@dataclass
class ESFTSection:
    """Expert-Specialized Fine-Tuning (align/train/esft.py): train only the routed experts the task uses."""

    score: Literal["token", "gate"] = "token"  # token: share of top-k choices; gate: share of gate weight
    top_p: float = ranged(0.2, Range(0, 1, open_low=True))  # per layer: fewest experts whose scores reach this share
    sample_tokens: int = ranged(131072, AT_LEAST_1)  # training tokens the scoring pass routes
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False  # attention, norms, embeddings, dense MLPs, router gates, LM head


@dataclass
class OptimSection:
    lr: float = ranged(2e-4, POSITIVE)
    betas: list[float] = ranged([0.9, 0.95], Range(0, 1, open_high=True))
    eps: float = ranged(1e-8, POSITIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)  # on matrices only, never on norms or biases

    def validate(self, where: str) -> None:
        if len(self.betas) != 2:
            raise RecipeError(f"{where}: 'optim.betas' must hold two values, got {self.betas}")


@dataclass
class ScheduleSection:
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = ranged(0, NON_NEGATIVE)
    min_lr_ratio: float = ranged(0.0, FRACTION)  # cosine: final lr = lr * min_lr_ratio
    step_at: list[float] = ranged([0.8, 0.9], FRACTION)  # step: fractions of the steps
    step_factor: float = ranged(0.316, Range(0, 1, open_low=True))  # step: lr multiplier at each `step_at`


@dataclass
class LoopSection:
    """What every training loop (SFT, RL) shares."""

    max_grad_norm: float | None = ranged(1.0, POSITIVE)  # null = no clipping
    bf16: bool = True  # bf16 autocast where supported (CUDA); CPU runs float32
    # activation checkpointing per decoder layer: false = keep every activation; true = keep each layer's
    # input, re-run the whole layer in backward; selective = keep the outputs of its matrix products and
    # attention, re-run only the cheap ops (backward re-runs no GEMM; align/train/activation_checkpointing.py)
    gradient_checkpointing: Literal[False, True, "selective"] = False
    # torch.compile of each decoder layer (never the whole model); auto = off on CPU; on CUDA on for
    # `align sft` and `align rl`, off for rm, as measured (align/train/regional_compile.py: AUTO_ON_CUDA)
    compile: Literal["auto", True, False] = "auto"
    aux_loss_alpha: float | None = ranged(None, NON_NEGATIVE)  # MoE balance-loss coefficient; null = config's
    seed: int = ranged(0, SEED)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    log_every: int = ranged(1, AT_LEAST_1)
    eval_every: int = ranged(0, NON_NEGATIVE)  # 0 = at the end only
    save_every: int = ranged(0, NON_NEGATIVE)  # 0 = at the end only
    keep_checkpoints: int | None = ranged(None, AT_LEAST_1)  # keep only the newest N step checkpoints
    # optimizer steps whose loss or gradient norm is NaN / inf that are skipped (not applied) before
    # the run stops with an error; 0 = stop at the first
    max_nonfinite_steps: int = ranged(0, NON_NEGATIVE)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: DDP for LoRA, FSDP2 for full FT


@dataclass
class TrainSection(LoopSection):
    steps: int | None = ranged(None, AT_LEAST_1)  # optimizer steps; or
    epochs: float | None = ranged(None, POSITIVE)  # passes over the training rows
    # rows per process per forward; auto (align sft): the largest that fits the GPU's memory, splitting
    # train.batch_size with grad_accum derived (align/train/micro_batch.py)
    micro_batch_size: int | Literal["auto"] = ranged(8, AT_LEAST_1)
    grad_accum: int = ranged(1, AT_LEAST_1)
    batch_size: int | None = ranged(None, AT_LEAST_1)  # rows per optimizer step, all processes: with auto only

    def validate(self, where: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise RecipeError(f"{where}: set exactly one of 'train.steps' or 'train.epochs'")
        if self.micro_batch_size == "auto":
            if self.batch_size is None:
                raise RecipeError(f"{where}: 'train.micro_batch_size: auto' needs 'train.batch_size' (rows per "
                                  "optimizer step, all processes), the batch it splits into micro-batches")
            if self.grad_accum != 1:
                raise RecipeError(f"{where}: with 'train.micro_batch_size: auto' leave 'train.grad_accum' out: "
                                  "it is derived (train.batch_size / processes / the micro-batch chosen)")
        elif self.batch_size is not None:
            raise RecipeError(f"{where}: 'train.batch_size' goes with 'train.micro_batch_size: auto'; with an "
                              "integer micro_batch_size a step takes micro_batch_size x grad_accum x processes rows")


@dataclass
class EvalSection:
    exact_match: bool = False  # greedy-decode eval prompts, compare the answer (rewards.extract rule)
    samples: int | None = ranged(None, AT_LEAST_1)  # at most this many eval rows for exact match (null = all)
    max_new_tokens: int = ranged(16, AT_LEAST_1)
    batch_size: int = ranged(64, AT_LEAST_1)  # prompts per decode batch; also rows per eval-loss batch
    engine: bool = False  # decode with align.generation's engine (KV cache) instead of full forwards


@dataclass
class OutputSection:
    run_dir: str = "runs/sft"
    overwrite: bool = False  # a fresh run into a run_dir holding an earlier run deletes it first
    merge: bool = True  # write <run_dir>/final: merged full HF checkpoint + tokenizer
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, trackio, ...
    progress: bool = True


@dataclass
class RecipeBase:
    """The sections every training recipe has (SFT, RL): what the run floor (align.train.run) reads.
    A recipe narrows `data`, `schedule`, `train`, `eval` and `output` to its own subclasses."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSourceSection = field(default_factory=DataSourceSection)
    lora: LoRASection | None = None  # null = full fine-tuning
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: LoopSection = field(default_factory=LoopSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    resume_from: str | None = None  # a checkpoint directory, or 'latest' (newest in run_dir)

    MODEL_HEAD: ClassVar[str] = "lm"  # the head of the trained model: lm (causal LM) | score (reward model)
    LOOP: ClassVar[str] = "sft"  # the loop's name where a default depends on it (train.compile: auto)


@dataclass
class SFTRecipe(RecipeBase):
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    esft: ESFTSection | None = None  # null = no ESFT; set: ESFT instead of LoRA / full fine-tuning

    def validate(self, where: str) -> None:
        if self.esft is not None and self.lora is not None:
            raise RecipeError(f"{where}: 'esft' and 'lora' are exclusive fine-tuning modes; set one of them "
                              f"to null (lora=null for ESFT, esft=null for LoRA)")


# ------------------------------------------------------------------------------------- RL schema


@dataclass
class RewardSpec:
    """One reward: a registered name or 'package.module:function' (rewards.registry), its weight in the
    total, its keyword parameters, and the label its metrics go under (default: the name)."""

    SHORTHAND: ClassVar[str] = "name"  # a bare string `- exact_match` is `- name: exact_match`
    name: str = ""
    weight: float = ranged(1.0, ANY)  # negative: a penalty
    params: dict[str, Any] = field(default_factory=dict)  # the function's keyword arguments
    label: str | None = None

    def validate(self, where: str) -> None:
        if not self.name:
            raise RecipeError(f"{where}: a reward needs a 'name' (a registered reward or 'module:function')")


@dataclass
class PromptDataSection(DataSourceSection):
    """Prompt rows: a `prompt` column (chat messages or plain text) plus any extra columns (`answer`,
    `tests`, ...) that the reward functions receive as keyword lists, as in TRL. `eval`: held-out rows
    for exact match (`prompt` + `answer`, or `messages`)."""

    prompt_column: str = "prompt"
    max_prompt_length: int = ranged(512, AT_LEAST_1)  # longer prompts keep their last tokens (counted)


@dataclass
class GRPOSection:
    """Group-relative policy optimisation; option names follow trl.GRPOConfig where the concept is the same."""

    prompts_per_step: int = ranged(16, AT_LEAST_1)  # prompts per round, global: all processes (divides by them)
    num_generations: int = ranged(8, Range(2))  # G: completions per prompt (a group of one has no baseline)
    max_completion_length: int = ranged(256, AT_LEAST_1)
    temperature: float = ranged(1.0, POSITIVE)
    top_p: float = ranged(1.0, Range(0, 1, open_low=True))
    top_k: int = ranged(0, NON_NEGATIVE)  # 0 = off
    num_iterations: int = ranged(1, AT_LEAST_1)  # μ: optimizer steps per generation round (μ > 1: old log-probs)
    beta: float = ranged(0.0, NON_NEGATIVE)  # KL coefficient (k3 estimator); 0 skips the reference pass
    epsilon: float = ranged(0.2, NON_NEGATIVE)
    epsilon_high: float | None = ranged(None, NON_NEGATIVE)  # clip-higher (DAPO); null = epsilon; cispo: the ratio cap
    delta: float | None = ranged(None, Range(1, open_low=True))  # cap on the unclipped ratio; null = off
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "dapo"
    sapo_temperature_neg: float = ranged(1.05, POSITIVE)  # sapo's gate temperature where the advantage is <= 0
    sapo_temperature_pos: float = ranged(1.0, POSITIVE)  # ... and where it is > 0
    top_entropy_quantile: float = ranged(1.0, FRACTION)  # share of tokens (highest entropy) the policy term keeps
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    # MoE: the policy's forwards route each rollout token to the experts the engine used (recomputing
    # only the gate weights); none: they route by themselves. Default rollout: on the H200 at V2-Lite
    # shape it lowered policy/logprob_mismatch 0.0293 -> 0.0237 for +0.8% step time (bench/BENCHMARKS.md)
    routing_replay: Literal["none", "rollout"] = "rollout"
    # DAPO dynamic sampling: drop groups whose rewards are all equal, generate more prompts until the step
    # holds prompts_per_step informative groups, at most max_sampling_rounds extra rounds per step
    dynamic_sampling: bool = False
    max_sampling_rounds: int = ranged(4, AT_LEAST_1)
    micro_batch_size: int = ranged(16, AT_LEAST_1)  # completions per forward / backward, per process
    rollout_batch: int = ranged(256, AT_LEAST_1)  # decode slots of the rollout engine, per process
    # rounds in a row in which every reward raised or returned None (no learning signal) before the
    # run stops with an error; each such round is a warning
    max_failed_reward_steps: int = ranged(3, AT_LEAST_1)


@dataclass
class RLTrainSection(LoopSection):
    steps: int = ranged(100, AT_LEAST_1)  # generation rounds (each gives grpo.num_iterations optimizer steps)
    sample_every: int = ranged(10, NON_NEGATIVE)  # sample completions + rewards to completions.jsonl (0 = never)
    samples_per_log: int = ranged(4, AT_LEAST_1)  # prompts (with all their completions) per completions.jsonl entry


@dataclass
class RLEvalSection(EvalSection):
    exact_match: bool = True  # greedy exact match on data.eval (synthetic: its test split)
    engine: bool = True  # decode with the rollout engine (false: plain full forwards, slow)
    rewards: bool = False  # also score the greedy eval replies with the recipe's rewards (eval/reward/mean, ...)


@dataclass
class RLScheduleSection(ScheduleSection):
    name: Literal["cosine", "step", "constant"] = "constant"


@dataclass
class RLOutputSection(OutputSection):
    run_dir: str = "runs/rl"
    merge: bool = True  # write <run_dir>/final: full HF checkpoint (LoRA merged) + tokenizer


@dataclass
class RLRecipe(RecipeBase):
    """`model` is usually a `path`: the SFT output. `lora: null` = full fine-tuning (the reference is then
    a frozen copy when grpo.beta > 0)."""

    LOOP: ClassVar[str] = "rl"
    data: PromptDataSection = field(default_factory=PromptDataSection)
    schedule: RLScheduleSection = field(default_factory=RLScheduleSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    eval: RLEvalSection = field(default_factory=RLEvalSection)
    output: RLOutputSection = field(default_factory=RLOutputSection)
    rewards: list[RewardSpec] = field(default_factory=list)  # `- exact_match` or `- name: ..., weight: ...`
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def validate(self, where: str) -> None:
        if not self.rewards:
            raise RecipeError(f"{where}: 'rewards' is empty; list at least one reward (e.g. - exact_match)")
        self.reward_functions(where)

    def reward_functions(self, where: str = "<recipe>") -> list:
        """The rewards bound to their functions (rewards.registry.build_rewards): built once, when the
        recipe is checked, and the same objects on every later call."""
        from rewards import RewardConfigError, build_rewards

        if "_reward_functions" not in self.__dict__:  # an instance cache, not a recipe field
            try:
                self.__dict__["_reward_functions"] = build_rewards(self.rewards, where=f"{where}: rewards")
            except RewardConfigError as err:
                raise RecipeError(str(err)) from err
        return self.__dict__["_reward_functions"]


# ------------------------------------------------------------------------------------- RM schema


@dataclass
class PreferenceSyntheticSection:
    """Arithmetic preference pairs (data_tools.synthetic_preferences), written to <run_dir>/data/."""

    train: int = ranged(3000, AT_LEAST_1)  # training pairs
    test: int = ranged(400, AT_LEAST_1)  # held-out pairs (no problem shared with train)
    seed: int = ranged(0, SEED)
    max_operand: int = ranged(99, AT_LEAST_1)
    ops: str = "+-"
    borrow_share: float = ranged(0.5, FRACTION)  # share of pairs whose rejected reply has the borrow bug
    # the other pairs' rejected reply: any number, a near miss, or the likeliest one-digit mistake of model.path (the
    # SFT model the reward model starts from: the near misses RL from it samples; align.train.rm.likeliest_mistakes)
    other_wrong: Literal["random", "near", "likeliest", "mixed"] = "random"  # mixed: likeliest and random alternately


@dataclass
class PreferenceDataSection(DataSourceSection):
    """Preference pairs in TRL's formats (data_tools/preferences.py): `chosen` + `rejected` conversations, or
    `prompt` + `chosen` + `rejected`; an optional numeric `margin` column."""

    synthetic: PreferenceSyntheticSection | None = None  # instead of `train` / `eval`
    eval_fraction: float = ranged(0.0, Range(0, 1, open_high=True))  # held-out share of train when no `eval`
    max_length: int = ranged(1024, Range(2))  # a pair with a longer side is dropped (counted), as in TRL


@dataclass
class RMSection:
    """The Bradley-Terry loss -log sigmoid(r_chosen - r_rejected [- margin]); names as trl.RewardConfig."""

    center_rewards_coefficient: float | None = ranged(None, NON_NEGATIVE)  # + c * mean((r_c + r_r)^2); null = off


@dataclass
class RMEvalSection:
    batch_size: int = ranged(64, AT_LEAST_1)  # pairs per eval forward


@dataclass
class RMOutputSection(OutputSection):
    run_dir: str = "runs/rm"
    merge: bool = True  # write <run_dir>/final: the sequence-classification checkpoint (LoRA merged) + tokenizer


@dataclass
class RMRecipe(RecipeBase):
    """`align rm`: a reward model (align.models.DeepseekV2ForSequenceClassification) from `model.path`, usually
    the SFT output (its LM head is replaced by a scalar score head), or from a sequence-classification
    checkpoint. train.micro_batch_size counts pairs."""

    MODEL_HEAD: ClassVar[str] = "score"
    LOOP: ClassVar[str] = "rm"
    data: PreferenceDataSection = field(default_factory=PreferenceDataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: RMEvalSection = field(default_factory=RMEvalSection)
    output: RMOutputSection = field(default_factory=RMOutputSection)
    rm: RMSection = field(default_factory=RMSection)

    def validate(self, where: str) -> None:
        if self.train.micro_batch_size == "auto":
            raise RecipeError(f"{where}: 'train.micro_batch_size: auto' is built for align sft; align rm takes a "
                              "number of pairs per forward")
