"""The recipe's sections as typed dataclasses: one field docstring each (the README's key reference is generated
from them), and a `check(key)` that names the YAML key of a bad value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmcl.config import KeyFn, require
from llmcl.models import check_model_path


@dataclass
class ModelConfig:
    """The model every stage starts from."""

    path: str = "builtin:smollm2-135m"
    """A hub id (org/name), a local model directory (relative to the working directory; stored absolute), builtin:smollm2-135m or builtin:tiny."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto = float32 master weights (bf16 autocast on GPUs that support it)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of model.path."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null = transformers' default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def check(self, key: KeyFn) -> None:
        check_model_path(self.path, key("path"))


@dataclass
class DataConfig:
    """Where a stage's examples come from and how they become tokens."""

    path: str
    """builtin:<task>, a local .json/.jsonl/.csv/.parquet/.txt file, a directory holding <split>.<ext> files, or a hub dataset id."""
    format: Literal["auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca"] = "auto"
    """text = packed language modelling; prompt_completion = loss on the completion only; messages (OpenAI {role, content} turns), sharegpt ({"conversations": [{from, value}]}) and alpaca (instruction/input/output) = chat turns through the tokenizer's chat template (loss on the assistant turns); auto = from the record fields."""
    train_split: str = "train"
    """Split (hub datasets, directories) used for training."""
    test_split: str | None = "test"
    """Split used for evaluation; null = no test data for this stage."""
    test_path: str | None = None
    """A separate file for the test split (when path is a single file)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    prompt_template: str = "{prompt}"
    """Python format string over a record's fields giving the prompt, e.g. 'Text: {sentence}\\nLabel:'."""
    completion_template: str = "{completion}"
    """Python format string over a record's fields giving the completion, e.g. ' {label}'."""
    text_field: str = "text"
    """Record field holding the document for the text format."""
    add_bos: bool = False
    """Text format: begin every document with the tokenizer's BOS token (documents are always followed by EOS). Off as in LLaMA-Factory's pre-training data; turn it on for models trained to see a BOS first (Gemma)."""
    messages_field: str = "messages"
    """Record field holding the chat turns for the messages format."""
    chat_template: bool = False
    """Wrap prompt/completion pairs as a user and an assistant turn of the tokenizer's chat template."""
    max_train_samples: int | None = None
    """Use only N training records, a seeded sample kept in the file's order; null = all. A text dataset streamed from the hub (length unknown) takes the first N of datasets' buffered shuffle of the stream (10,000 records)."""
    max_test_samples: int | None = None
    """Use only N test records, a seeded sample kept in the file's order; null = all."""
    holdout: int | float | None = None
    """Hold out this many training records (an integer) or this fraction (a float) as the test split, seeded; for sources without one."""
    choices: list[str] | None = None
    """The label set of a classification stage: its test split is then scored both ways, the generated label by exact match (the accuracy matrix) and loglikelihood over these completions (the 'labels' columns); null = exact match only."""
    drop_unknown_answers: bool = False
    """With choices: leave out test items whose answer is none of them (e.g. MNLI's unlabeled '-' items) instead of refusing the recipe."""

    def check(self, key: KeyFn) -> None:
        from llmcl.data.sources import check_path

        check_path(self.path, key("path"))
        if self.test_path is not None:
            check_path(self.test_path, key("test_path"), local_only=True)
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            require(value is None or value > 0, key(name), value, "a positive integer or null")
        if isinstance(self.holdout, float):
            require(0 < self.holdout < 1, key("holdout"), self.holdout, "a fraction in (0, 1) or a number of records")
        elif self.holdout is not None:
            require(self.holdout > 0, key("holdout"), self.holdout, "a positive number of records or a fraction")


@dataclass
class ReplayDataConfig(DataConfig):
    """A named replay source (e.g. a slice of the original pre-training corpus)."""

    weight: float = 1.0
    """Relative weight of this source among the replay sources."""

    def check(self, key: KeyFn) -> None:
        super().check(key)
        require(self.weight > 0, key("weight"), self.weight, "a number > 0")


@dataclass
class ReplayConfig:
    """Compute-equivalent replay (Ibrahim et al. 2024): a fixed share of every step comes from earlier data."""

    ratio: float = 0.0
    """Fraction of every optimizer step's examples (blocks, for text) drawn from the replay sources; the stage's own data fills the rest. The loss averages over trained tokens, so replayed examples with more of them weigh more: a stage whose replayed examples carry over twice (or under half) the trained tokens of its own prints their share of the tokens."""
    previous_stages: bool = True
    """Replay the earlier stages' training data (each earlier stage weighted equally)."""
    previous_weight: float = 1.0
    """Weight of the earlier stages together, relative to the datasets' weights."""
    datasets: list[ReplayDataConfig] = field(default_factory=list)
    """Named replay datasets, each a data source with a weight."""

    def check(self, key: KeyFn) -> None:
        require(0 <= self.ratio < 1, key("ratio"), self.ratio, "a fraction in [0, 1)")
        require(self.previous_weight >= 0, key("previous_weight"), self.previous_weight, "a number >= 0")


@dataclass
class TrainConfig:
    """Optimisation settings for every stage (a stage may override any of them under stages.N.train)."""

    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the decay as a fraction of lr."""
    warmup: int | float = 0.03
    """Linear warmup at the start of every stage: an integer is a number of steps, a float a fraction of the stage;
    more steps than the stage has warm up over the whole stage (its last step at lr)."""
    warmup_start: Literal["zero", "previous"] = "zero"
    """Where warmup starts: 0, or the previous stage's final lr (re-warming from where the last stage ended)."""
    schedule: Literal["cosine", "linear", "constant", "wsd", "infinite"] = "cosine"
    """After warmup: cosine/linear re-decay to min_lr_ratio*lr; constant at lr; wsd = stable then decay; infinite = cooldown to const_lr_ratio*lr, constant, optional anneal (Ibrahim et al. 2024)."""
    decay: int | float = 0.1
    """wsd: length of the final decay (steps, or a fraction of the stage)."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: shape of the final decay (sqrt = 1 - sqrt)."""
    const_lr_ratio: float = 0.5
    """infinite: the constant lr as a fraction of lr."""
    cooldown: int | float = 0.1
    """infinite: steps (or fraction of the first stage) from the end of warmup down to the constant lr."""
    cooldown_shape: Literal["cosine", "inv_sqrt"] = "cosine"
    """infinite: cooldown shape."""
    inv_sqrt_alpha: float = 10.0
    """infinite: timescale alpha of the inverse-sqrt cooldown (larger = steeper start)."""
    anneal: int | float = 0
    """infinite: anneal to min_lr_ratio*lr over the last steps (or fraction) of this stage, for a released checkpoint; 0 = none."""
    anneal_shape: Literal["exp", "linear"] = "exp"
    """infinite: anneal shape."""
    anneal_branch: bool = True
    """infinite: the next stage continues from the weights saved just before the anneal (the paper's branch), not the annealed ones."""
    optimizer_state: Literal["reset", "keep"] = "reset"
    """Optimizer state at the start of a stage: reset (fresh AdamW moments, the paper's choice) or keep the previous stage's."""
    max_steps: int | None = None
    """Optimizer steps per stage; null = max_tokens, or else epochs over the stage's training data."""
    max_tokens: int | None = None
    """Token budget per stage: steps = ceil(max_tokens / (global batch x seq_len)) (exact for packed text)."""
    epochs: float = 1.0
    """Passes over the stage's training data when max_steps is null."""
    batch_size: int = 8
    """Examples per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 512
    """Maximum tokens per example (longer ones are truncated); block length for packed text."""
    packing: bool = False
    """Lay each micro-batch's examples out without padding, positions restarting at every example and attention confined to it (one row with sdpa or flash-attention; rows of up to seq_len tokens with eager): the same examples, loss and gradients as one padded row per example (needs a model whose positions come from position_ids)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision: auto = bf16 on GPUs that support it, fp32 on CPU."""
    save_every: int = 0
    """Write a resumable step checkpoint every N optimizer steps (0 = only at the end of a stage)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimizer steps."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite gradient norm or loss: stop the stage (never marked done; its last step checkpoint is kept), or skip that optimizer step and count it (not under DeepSpeed). May change between a stop and the resume."""

    def check(self, key: KeyFn) -> None:
        require(self.lr > 0, key("lr"), self.lr, "a number > 0")
        require(0 <= self.min_lr_ratio <= 1, key("min_lr_ratio"), self.min_lr_ratio, "a number in [0, 1]")
        if isinstance(self.warmup, float):
            require(0 <= self.warmup <= 1, key("warmup"), self.warmup,
                    "a fraction in [0, 1] (float) or a number of steps (integer)")
        else:
            require(self.warmup >= 0, key("warmup"), self.warmup, "a non-negative number of steps")
        require(self.max_steps is None or self.max_steps > 0, key("max_steps"), self.max_steps,
                "a positive integer or null")
        require(self.max_tokens is None or self.max_tokens > 0, key("max_tokens"), self.max_tokens,
                "a positive integer or null")
        for name in ("decay", "cooldown", "anneal"):
            value = getattr(self, name)
            if isinstance(value, float):
                require(0 <= value <= 1, key(name), value, "a fraction in [0, 1] (float) or a number of steps (integer)")
            else:
                require(value >= 0, key(name), value, "a non-negative number of steps")
        require(0 < self.const_lr_ratio <= 1, key("const_lr_ratio"), self.const_lr_ratio, "a number in (0, 1]")
        require(self.inv_sqrt_alpha > 0, key("inv_sqrt_alpha"), self.inv_sqrt_alpha, "a number > 0")
        if self.schedule == "infinite" and self.anneal and self.anneal_shape == "exp":
            require(self.min_lr_ratio > 0, key("min_lr_ratio"), self.min_lr_ratio,
                    "a number > 0 (an exponential anneal cannot reach 0)")
        require(self.epochs > 0, key("epochs"), self.epochs, "a number > 0")
        for name in ("batch_size", "grad_accum", "seq_len", "log_every"):
            require(getattr(self, name) > 0, key(name), getattr(self, name), "a positive integer")
        require(self.save_every >= 0, key("save_every"), self.save_every, "0 or a positive integer")
        require(self.weight_decay >= 0, key("weight_decay"), self.weight_decay, "a number >= 0")
        require(self.max_grad_norm >= 0, key("max_grad_norm"), self.max_grad_norm, "a number >= 0 (0 = off)")
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), key("adam_betas"),
                self.adam_betas, "two numbers in [0, 1)")
        require(self.adam_eps > 0, key("adam_eps"), self.adam_eps, "a number > 0")


@dataclass
class StageConfig:
    """One stage of the continual stream."""

    data: DataConfig
    """The stage's data."""
    name: str | None = None
    """Unique stage name (letters, digits, _ . -); default from the data path."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of the recipe's train settings for this stage only, e.g. {lr: 3e-5, max_steps: 50}."""
    replay: dict[str, Any] = field(default_factory=dict)
    """Overrides of the recipe's replay settings for this stage only, e.g. {ratio: 0.25}."""


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl (always written)."""

    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Accelerate trackers to log to; W&B honours WANDB_MODE=offline."""
    project: str | None = None
    """Tracker project/run name; default = the recipe name."""


@dataclass
class EvalConfig:
    """Forgetting, measured: lm-eval on every stage's test split (and any harness tasks) after each stage."""

    after_each_stage: bool = True
    """Score the base model and every finished stage during `llmcl train` (else use `llmcl eval` later)."""
    stage_tasks: bool = True
    """Turn every stage's test split into an lm-eval task (columns of the accuracy matrix)."""
    tasks: list[str] = field(default_factory=list)
    """Extra lm-eval tasks for general ability: harness names (arc_easy, ...), llmcl's local ones (llmcl_arc_easy, ...) or tasks under include_path."""
    tasks_every_stage: bool = True
    """Score eval.tasks after every stage; false = only for the base model and the last stage (general ability is the slow part of a row)."""
    include_path: list[str] = field(default_factory=list)
    """Directories with your own lm-eval task YAMLs."""
    data_dir: str | None = None
    """Directory of the local general-ability data used by llmcl_* tasks (default: $LLMCL_EVAL_DATA or ../shared/data/eval)."""
    limit: int | None = None
    """At most this many samples per task (null = all)."""
    tasks_limit: int | str | None = "same"
    """At most this many samples per eval.tasks task: a number, null (= all) or 'same' (= eval.limit)."""
    batch_size: int | str = 16
    """lm-eval batch size, or 'auto' (GPU)."""
    max_new_tokens: int = 32
    """Upper bound on generated tokens for generation stage tasks."""
    max_prompt_tokens: int | None = None
    """Leave out stage test items whose prompt is longer than this many tokens (null = keep all), e.g. the
    train.seq_len the stages train at; applied before the seeded shuffle and eval.limit."""
    num_fewshot: int | None = None
    """Few-shot examples for every task but a chat stage's, which is scored zero-shot (null = each task's default: none for a stage's task, whose shots come from its own test split)."""
    unseen_stages: Literal["all", "next"] = "all"
    """Which stages not trained yet a row scores: all (the whole matrix) or next (only the next stage's task, all that FWT reads: the matrix above that stays empty; the base row scores every stage)."""
    seen_stages: Literal["all", "current"] = "all"
    """Which stages already trained a row scores: all (the whole matrix) or current (only the stage just trained; the last stage's row scores every stage). AA, BWT and FWT read only those cells (with unseen_stages: next a 15-stage run scores 43 cells after its stages instead of 134); forgetting's best earlier score is then the one just after each stage, and a run in progress shows the current stage's score as its AA."""
    metric: dict[str, str] = field(default_factory=dict)
    """The metric a task's cells show, by lm-eval task name, e.g. {hellaswag: acc_norm, llmcl_arc_easy: acc_norm} (default: the first of exact_match, acc, bits_per_byte, word_perplexity, perplexity the task reports). Every metric a task reports is kept in the rows: changing this renders the report again without scoring."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype the model is evaluated in (lm-eval's dtype): auto = bfloat16/float16 where train.precision trains in bf16/fp16 mixed precision (auto: bf16 on GPUs that support it), else model.dtype."""

    def check(self, key: KeyFn) -> None:
        require(self.limit is None or self.limit > 0, key("limit"), self.limit, "a positive integer or null")
        require(self.tasks_limit in (None, "same") or (isinstance(self.tasks_limit, int) and self.tasks_limit > 0),
                key("tasks_limit"), self.tasks_limit, "a positive integer, null or 'same'")
        require(self.max_new_tokens > 0, key("max_new_tokens"), self.max_new_tokens, "a positive integer")
        require(self.num_fewshot is None or self.num_fewshot >= 0, key("num_fewshot"), self.num_fewshot,
                "a number of shots >= 0 or null")
        require(self.max_prompt_tokens is None or (type(self.max_prompt_tokens) is int and self.max_prompt_tokens > 0),
                key("max_prompt_tokens"), self.max_prompt_tokens, "a positive integer or null")
        require(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0),
                key("batch_size"), self.batch_size, "a positive integer or 'auto'")
        for i, p in enumerate(self.include_path):
            require(Path(p).expanduser().is_dir(), key(f"include_path.{i}"), p, "an existing directory of task YAMLs")
        require(self.data_dir is None or Path(self.data_dir).expanduser().is_dir(), key("data_dir"), self.data_dir,
                "an existing directory (or null for $LLMCL_EVAL_DATA / ../shared/data/eval)")


@dataclass
class CheckpointsConfig:
    """What a run keeps of its finished stages (may change between a stop and the resume)."""

    keep_stages: int | None = None
    """Keep the weights of only the last N finished stages (null = every stage): an older stage's model, method state and optimizer state are deleted once its evaluation row is written (adapters a kept stage merges stay); the ledger, stage.json and the rows stay, so resume, the report and export of a kept stage work as before. Needs eval.after_each_stage (a deleted stage cannot be scored later)."""

    def check(self, key: KeyFn) -> None:
        require(self.keep_stages is None or (type(self.keep_stages) is int and self.keep_stages > 0),
                key("keep_stages"), self.keep_stages, "a positive integer or null (keep every stage)")


@dataclass
class DistributedConfig:
    """How `llmcl train` launches itself when not started by a launcher (accelerate launch, torchrun, srun)."""

    accelerate_config: str | None = None
    """An accelerate config YAML (e.g. recipes/accelerate/zero2.yaml): a plain `llmcl train` re-launches itself through `accelerate launch --config_file` with it. Ignored (with a note) when a launcher already started llmcl: launcher flags win."""
    num_processes: int | None = None
    """Processes for that launch (null = the accelerate config's num_processes)."""
    timeout_minutes: float = 180.0
    """Collective timeout: how long other ranks wait for rank 0 (e.g. during evaluation between stages)."""

    def check(self, key: KeyFn) -> None:
        if self.accelerate_config is not None:
            require(Path(self.accelerate_config).expanduser().is_file(), key("accelerate_config"),
                    self.accelerate_config, "an existing accelerate config YAML (see recipes/accelerate/)")
        require(self.num_processes is None or self.num_processes > 0, key("num_processes"), self.num_processes,
                "a positive integer or null")
        require(self.timeout_minutes > 0, key("timeout_minutes"), self.timeout_minutes, "a number of minutes > 0")
