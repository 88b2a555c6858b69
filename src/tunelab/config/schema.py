"""The configuration schema: every setting, its default and its meaning, in one place.

The YAML file, the dotted command-line overrides (``data.max_seq_len=512``) and validation all
come from these classes. Unknown keys are rejected (``extra="forbid"``). Later features add
sections (``method``, ``train``, ``eval``...) as new classes and fields on :class:`Config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

#: Every field a data record may have (the data layer reads these; data.columns maps onto them).
RECORD_FIELDS = ("instruction", "input", "output", "system", "history", "messages", "prompt",
                 "chosen", "rejected", "kto_tag", "text")  # fmt: skip


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A catalog name, a Hugging Face model folder, a .gguf file, or a hub id.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer to use instead of the model's own.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on a GPU that supports it, else fp32. fp16 uses a loss scaler.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations: less memory, ~20% slower."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")


class MethodConfig(Section):
    name: Literal["full", "freeze", "lora", "qlora"] = Field("lora", description="What is trained.")
    # lora / qlora
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default 2 x r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: list[str] | Literal["all-linear", "attention", "qv"] = Field(
        "all-linear",
        description="Modules that get adapters: names, or all-linear | attention | qv.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bits: Literal[4, 8] = Field(
        4, description="qlora: 4-bit NF4 or 8-bit base weights (bitsandbytes, CUDA)."
    )
    # freeze
    trainable_layers: int = Field(
        2, ge=0, description="freeze: train the last N transformer layers."
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: also train modules whose name contains one of these.",
    )
    unfreeze_every: int = Field(
        0, ge=0, description="freeze: every M steps unfreeze more layers (0: off)."
    )
    unfreeze_layers: int = Field(
        1, gt=0, description="freeze: how many layers each unfreezing adds."
    )

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class PreferenceConfig(Section):
    """Settings of the preference objectives (``train.objective`` dpo, kto, simpo, orpo);
    ``docs/preference.md`` explains each and where it comes from."""

    beta: float | None = Field(
        None, gt=0,
        description="How far the policy may move from the reference (dpo, kto: 0.1) or the "
        "reward scale (simpo: 2.0). Default: the objective's own.",
    )  # fmt: skip
    dpo_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="dpo: sigmoid (the DPO paper) or ipo (squared, length-normalised: IPO).",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="dpo sigmoid: the share of pairs assumed mislabelled (conservative DPO).",
    )  # fmt: skip
    desirable_weight: float | None = Field(
        None, gt=0,
        description="kto: weight of answers tagged true. Default: balanced with "
        "undesirable_weight so both kinds weigh the same in all (the KTO paper's advice).",
    )  # fmt: skip
    undesirable_weight: float | None = Field(
        None, gt=0, description="kto: weight of answers tagged false. Default: balanced."
    )
    simpo_gamma: float = Field(
        1.0, ge=0.0, description="simpo: the target reward margin gamma (gamma/beta = 0.5)."
    )
    orpo_lambda: float = Field(
        0.1, gt=0.0, description="orpo: weight of the odds-ratio term beside the SFT loss."
    )
    precompute_ref: Literal["auto"] | bool = Field(
        "auto",
        description="dpo, kto: reference log-probabilities computed once before training and "
        "cached in the run folder (true), or computed at every step (false: the base with the "
        "LoRA adapter disabled, or a frozen copy for full/freeze). auto: true for full/freeze "
        "(no second copy of the model in memory), false for LoRA (no copy either way).",
    )


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "kto", "simpo", "orpo"] = Field(
        "sft",
        description="What is optimised: sft (weighted next-token loss on the answers); dpo, "
        "simpo, orpo (preference pairs); kto (answers tagged good or bad). See train.preference.",
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    micro_batch_tokens: PositiveInt | Literal["auto"] | None = Field(
        "auto",
        description="SFT: run each step's micro_batch_size x grad_accum sequences in as few "
        "forward passes as fit this many padded tokens (rows x longest), longest first. The "
        "step's gradient is unchanged; memory follows the budget. auto: micro_batch_size x the "
        "longest training sequence — no forward wider than the widest micro_batch_size rows can "
        "make, more and shorter rows where a step has them (null: micro_batch_size rows).",
    )  # fmt: skip
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm (null: off)."
    )
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup steps; overrides warmup_ratio."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="LR floor as a share of the peak.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps (default: ~10 per epoch)."
    )
    eval_batch_size: int | None = Field(None, gt=0, description="Default: micro_batch_size.")
    eval_at_start: bool = Field(
        True, description="Evaluate the untrained model first (the 'before' number)."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evals without improvement."
    )
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N steps (default: at each eval)."
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (plus the best).")
    keep: Literal["best", "last"] | None = Field(
        None,
        description="Which weights final/ holds: best (lowest validation loss, the untrained "
        "model included) or last (the last step). Default: best with validation data, else last.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile each decoder layer (regional: one compilation serves every "
        "layer). It fuses the elementwise work between matmuls but costs time at the first step "
        "(~50 s on a 2-core CPU; ~5 s once the same layer graph was compiled before, kept in "
        "the inductor cache, TORCHINDUCTOR_CACHE_DIR or $TUNELAB_HOME/inductor). auto compiles "
        "where the seconds it saves, estimated from the run's FLOPs, repay that: within the run "
        "when the graph is cached, else over this run and the next (docs/speed.md).",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Put each micro-batch's sequences in one row without padding, each attending "
        "only to itself (SFT only). The row's attention then spans all its tokens, so auto "
        "packs only where the padding it removes costs more than that, by the model's FLOPs "
        "(docs/speed.md).",
    )
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto",
        description="Several processes (torchrun --nproc-per-node N -m tunelab train ...): each "
        "step's micro-batches are split across them and the gradients summed, so the step is "
        "the one-process step (docs/distributed.md). ddp: every process holds the model; fsdp "
        "(full fine-tuning): each decoder layer's weights, gradients and AdamW state sharded, "
        "checkpoints sharded. auto: fsdp for full fine-tuning, ddp for the other methods, none "
        "for one process.",
    )
    distributed_timeout_s: int = Field(
        600, gt=0,
        description="Several processes: how long a collective waits for the other ranks before "
        "the job stops (a rank that died cannot leave the others hanging).",
    )  # fmt: skip
    doctor: Literal["warn", "stop", "off"] = Field(
        "warn",
        description="At each evaluation, look at the loss curve so far (docs/training.md, "
        "'Diagnosing a run'): warn prints a line when the learning rate looks too high or the "
        "run overfits; stop also stops the run there (the last checkpoint intact).",
    )

    @field_validator("doctor", "compile", "packing", mode="before")
    @classmethod
    def _off_on(cls, value: object) -> object:  # YAML reads a bare `off` / `on` as false / true
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    nan_action: Literal["skip", "stop"] = Field(
        "skip", description="On a NaN/Inf loss or gradient."
    )
    max_nan_skips: int = Field(10, ge=0, description="Stop anyway after this many skipped steps.")
    seed: int = Field(42, description="Seed for initialisation, data order and dropout.")
    output_dir: str = Field("runs", description="Run folders go here: <output_dir>/<name>.")


class DataConfig(Section):
    path: str | None = Field(
        None, description="Training data: a .jsonl, .json (array) or .csv file."
    )
    val_path: str | None = Field(
        None, description="Validation file; when unset, val_ratio of path is held out."
    )
    val_ratio: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share held out for validation when val_path is unset."
    )
    format: Literal["auto", "alpaca", "chat", "preference", "kto", "text"] = Field(
        "auto", description="Record format; auto detects it from each record's fields."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename fields: {our_name: name_in_your_file}, e.g. {instruction: question}.",
    )
    system_prompt: str | None = Field(None, description="System prompt for records that have none.")
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template replacing the tokenizer's (default: the tokenizer's own).",
    )
    train_on: Literal["all", "last"] = Field(
        "all", description="Train every assistant turn, or only the last."
    )
    prompt_loss_weight: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Loss weight of prompt tokens (system, user, template) relative to response tokens.",
    )  # fmt: skip
    max_seq_len: int = Field(1024, gt=0, description="Longest sequence in tokens.")
    truncation: Literal["drop", "truncate_prompt", "truncate", "error"] = Field(
        "drop", description="What to do with longer sequences."
    )
    dedup: bool = Field(False, description="Drop exact duplicate records before training.")
    replay: str | None = Field(
        None,
        description="Keep what the model knew (docs/forgetting.md): a share of every step's "
        "examples comes from this pool. A FILE in any supported format (general instruction "
        "data, an earlier stage's data), or `self`: the base model's own answers to the "
        "package's general prompts, generated once before training and cached in the run folder.",
    )
    replay_ratio: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="With data.replay: the share of each step's sequences drawn from the replay "
        "pool (rounded to whole sequences; the task examples fill the rest).",
    )  # fmt: skip
    seed: int = Field(
        42, description="Seed for splits (the validation hold-out, `data split`) and shuffling."
    )
    split_ratios: list[float] = Field(
        default_factory=lambda: [0.7, 0.15, 0.15],
        description="`data split`: shares of train, val[, test]; two or three, summing to 1.",
    )
    diversity_threshold: float = Field(
        0.5, gt=0.0, le=1.0,
        description="`data check`: warn when one instruction covers more than this share.",
    )  # fmt: skip

    @field_validator("split_ratios")
    @classmethod
    def _split_shares(cls, value: list[float]) -> list[float]:
        shown = "/".join(f"{r:g}" for r in value)
        if len(value) not in (2, 3):
            raise ValueError(
                f"expected two or three shares (train, val[, test]), got {len(value)}: {shown}"
            )
        if not all(r > 0 for r in value):  # NaN fails too
            raise ValueError(f"split ratios {shown} must all be positive")
        if abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split ratios {shown} must sum to 1 (they sum to {sum(value):g})")
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        for ours in value:
            if ours not in RECORD_FIELDS:
                raise ValueError(
                    f"unknown record field {ours!r} (expected one of: {', '.join(RECORD_FIELDS)})"
                )
        return value


class JudgeConfig(Section):
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."
    )
    model: str | None = Field(
        None, description="The judge model: the endpoint's model id, or a local model."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable with the API key (must be set when named; default: OPENAI_API_KEY if set).",
    )
    rubric: str | None = Field(
        None, description="Rubric template with {prompt}, {reference}, {answer}."
    )


class EvalConfig(Section):
    data: str | None = Field(
        None, description="Held-out test file (same formats as training data)."
    )
    max_new_tokens: int = Field(256, gt=0, description="Longest generated answer.")
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    metrics: list[Literal["exact_match", "contains", "json_equal", "bleu", "rouge"]] = Field(
        default_factory=lambda: ["exact_match", "json_equal", "bleu", "rouge"],
        description="Built-in metrics.",
    )
    normalize: bool = Field(
        False, description="Exact match after lowercasing and stripping punctuation."
    )
    metric: str | None = Field(
        None, description="Your own metric: 'module:function' or 'file.py:function'."
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    general_data: str | None = Field(
        None, description="A general-ability set evaluated before and after (forgetting)."
    )
    at_end: bool = Field(
        False, description="Evaluate eval.data (and general_data) when training ends."
    )
    sheet: bool = Field(
        False,
        description="`eval`, `baseline`: also write a blind human-rating sheet of their answers.",
    )
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N examples.")
    shots: list[int] = Field(
        default_factory=lambda: [0, 3],
        description="`baseline`: shot counts, one evaluation each (k > 0 needs --train).",
    )
    shot_seed: int = Field(0, description="`baseline`: seed choosing which shots are drawn.")
    instruction: str | None = Field(
        None, description="`baseline`: extra instruction added to the system prompt."
    )

    @field_validator("shots")
    @classmethod
    def _shot_counts(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("expected at least one shot count, e.g. [0, 3]")
        if any(k < 0 for k in value):
            raise ValueError(f"shot counts must be non-negative (got {value})")
        return value


#: On-demand $/hour per card: illustrative 2025 list prices of large clouds, not a quote —
#: set plan.gpu_prices to what you pay (docs/plan.md).
GPU_PRICES = {"T4-16GB": 0.35, "L4-24GB": 0.80, "A100-40GB": 1.29, "L40S-48GB": 1.00,
              "H100-80GB": 2.99, "GH200-96GB": 3.19, "H200-141GB": 3.50}  # fmt: skip
#: $ per 1k training tokens of hosted fine-tuning APIs, as published (OpenAI pricing page,
#: 2025-06: gpt-4o-mini $3 and gpt-4.1-mini $5 per 1M training tokens; docs/plan.md).
API_PRICES = {"openai-gpt-4o-mini": 0.003, "openai-gpt-4.1-mini": 0.005}


class PlanConfig(Section):
    """`tunelab plan`: prices, and the throughput assumed until a run here measures it."""

    gpu_prices: dict[str, float] = Field(
        default_factory=lambda: dict(GPU_PRICES),
        description="$ per hour of each card plan quotes (illustrative list prices: set yours).",
    )
    api_prices: dict[str, float] = Field(
        default_factory=lambda: dict(API_PRICES),
        description="$ per 1k training tokens of hosted fine-tuning APIs, for comparison.",
    )
    mfu: float = Field(
        0.35, gt=0, le=1,
        description="GPU: share of a card's peak bf16 FLOP/s assumed when no run on that kind "
        "of card is in the run history (output_dir) to calibrate it.",
    )  # fmt: skip
    cpu_gflops_per_core: float = Field(
        40.0, gt=0,
        description="CPU: training GFLOP/s per core assumed when no CPU run is in the history.",
    )  # fmt: skip


class StageConfig(Section):
    """One stage of a run in stages (docs/forgetting.md): its data, learning rate and length,
    and which earlier stages it replays; it starts from the previous stage's weights."""

    name: str = Field(..., min_length=1, description="The stage's name (replay refers to it).")
    data: str = Field(..., description="The stage's training data (any supported format).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default train.lr).")
    epochs: float | None = Field(
        None, gt=0, description="Epochs over its data (default train.epochs)."
    )
    max_steps: int | None = Field(None, gt=0, description="Steps instead of epochs.")
    replay: list[str] = Field(
        default_factory=list, description="Earlier stages whose data this stage replays."
    )
    replay_ratio: float = Field(
        0.25, ge=0.0, lt=1.0, description="Share of each step's sequences from the replayed stages."
    )


class Config(Section):
    """The whole configuration of a tunelab run."""

    name: str | None = Field(
        None, description="Run name (default: derived from the data and time)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Train in stages, one after another in one run folder (each from the last "
        "one's weights); data.path is then unused, the validation set is data.val_path or the "
        "last stage's data.val_ratio share.",
    )

    @field_validator("stages")
    @classmethod
    def _stage_references(cls, stages: list[StageConfig]) -> list[StageConfig]:
        seen: list[str] = []
        for i, stage in enumerate(stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: {stage.name!r} is used by an earlier stage")
            for name in stage.replay:
                if name not in seen:
                    earlier = ", ".join(seen) or "none"
                    raise ValueError(f"stages[{i}].replay: no earlier stage named {name!r} "
                                     f"(earlier stages: {earlier})")  # fmt: skip
            seen.append(stage.name)
        return stages
