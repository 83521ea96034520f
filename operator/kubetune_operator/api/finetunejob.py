"""FineTuneJob (kubetune.io/v1alpha1): one fine-tuning run, from base model and data to an adapter in S3."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .common import (
    DATA_URI,
    QUANTITY,
    S3_URI,
    ApiModel,
    Condition,
    EnvVar,
    LocalObjectReference,
    ModelSource,
    PodMetadata,
    S3Connection,
    cel,
    rules,
)

DataFormat = Literal["auto", "text", "instruction", "chat", "completion"]
MethodType = Literal["lora", "qlora", "full", "prefix", "prompt", "ptuning"]
Metric = Literal[
    "perplexity", "bleu", "rouge", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1",
    "semantic_similarity", "accuracy", "precision", "recall", "f1", "confusion_matrix",
]  # fmt: skip
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "cosine_with_min_lr", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay",
]  # fmt: skip


# ---- data --------------------------------------------------------------------------------------


class DataSource(ApiModel):
    """A dataset file: JSON array or JSON Lines (CSV and Parquet too)."""

    uri: str = Field(
        ...,
        pattern=DATA_URI,
        max_length=2048,
        description="s3://bucket/key.jsonl, pvc://claim/path/file.jsonl or file:///path inside the image.",
    )
    format: DataFormat = Field(
        "auto",
        description="text {text}, instruction {instruction, input, output}, chat {messages}, completion "
        "{prompt, completion}; auto: detected from the records' keys.",
    )


class MixtureSource(DataSource):
    """One task of a multi-task mixture."""

    weight: float = Field(1.0, gt=0, le=1000, description="Relative sampling weight of this source.")


class Replay(ApiModel):
    """Continual learning: mix data from earlier tasks back in so the model does not forget them."""

    uri: str = Field(..., pattern=DATA_URI, max_length=2048, description="Data of the earlier task(s).")
    fraction: float = Field(
        0.1, gt=0, lt=1, description="Replay examples added, as a fraction of the training set size."
    )
    ewc_lambda: float = Field(
        0.0,
        ge=0,
        description="Elastic weight consolidation strength (0 = off); the Fisher is estimated on the replay data.",
    )


class Dataset(ApiModel):
    """Training, validation and test data and how to prepare it."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "has(self.train) || (has(self.mixture) && size(self.mixture) > 0)",
                "dataset needs training data: set dataset.train.uri, or dataset.mixture with one or more sources",
            ),
            cel(
                "!(has(self.validation) && has(self.validationSplit))",
                "set dataset.validation or dataset.validationSplit, not both",
            ),
        )
    }

    train: DataSource | None = Field(None, description="Training data.")
    validation: DataSource | None = Field(
        None, description="Validation data (for evaluation and early stopping)."
    )
    validation_split: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Hold out this fraction of the training data for validation (deterministic).",
    )
    test: DataSource | None = Field(None, description="Held-out test data, evaluated once after training.")
    max_seq_length: int = Field(1024, ge=8, le=1048576, description="Longest example in tokens.")
    packing: bool = Field(
        False, description="Pack examples into padding-free batches (faster; lora, qlora and full only)."
    )
    dedupe: Literal["none", "exact", "normalized"] = Field(
        "exact", description="Drop duplicate examples: exact text, or normalized (case, spaces, punctuation)."
    )
    mixture: list[MixtureSource] = Field(
        default_factory=list, max_length=32, description="Multi-task training: several sources with weights."
    )
    replay: Replay | None = Field(None, description="Continual learning replay buffer.")


# ---- method ------------------------------------------------------------------------------------


class LoraParams(ApiModel):
    """Low-rank adapters on the model's linear layers."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the update matrices (4-64 typical).")
    alpha: float = Field(16, gt=0, description="Scaling: updates are multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        max_length=64,
        description="Module names to adapt (e.g. q_proj, v_proj) or [all-linear]; empty: detected from the architecture.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class QLoraParams(LoraParams):
    """LoRA on a 4-bit (or 8-bit) quantized base model. Needs NVIDIA GPUs."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4, the QLoRA recipe) or 8.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


class VirtualTokenParams(ApiModel):
    """Prefix tuning, prompt tuning and P-tuning learn virtual tokens."""

    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Number of virtual tokens.")
    prompt_init_text: str | None = Field(
        None, max_length=4096, description="Prompt tuning: initialise the soft prompt from this text."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="P-tuning: hidden size of the prompt encoder."
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="P-tuning: prompt encoder."
    )
    prefix_projection: bool = Field(
        False, description="Prefix tuning: reparameterise the prefix with an MLP."
    )


def _block_matches(block: str, types: str) -> dict[str, str]:
    allowed = " || ".join(f"self.type == '{t}'" for t in types.split(","))
    return cel(
        f"!has(self.{block}) || {allowed}",
        f"method.{block} only applies to method.type {types.replace(',', ' or ')}: remove method.{block} "
        f"or set method.type to {types.split(',')[0]}",
        field_path=f".{block}",
    )


class Method(ApiModel):
    """The fine-tuning method and its parameters (the block named like the type)."""

    model_config = {
        "json_schema_extra": rules(
            _block_matches("lora", "lora"),
            _block_matches("qlora", "qlora"),
            _block_matches("prefix", "prefix"),
            _block_matches("prompt", "prompt"),
            _block_matches("ptuning", "ptuning"),
        )
    }

    type: MethodType = Field(
        "lora",
        description="lora (default), qlora (LoRA on a 4-bit base; GPUs only), full (all weights), prefix, prompt or "
        "ptuning (virtual tokens).",
    )
    lora: LoraParams | None = Field(None, description="LoRA parameters (type lora).")
    qlora: QLoraParams | None = Field(None, description="QLoRA parameters (type qlora).")
    prefix: VirtualTokenParams | None = Field(None, description="Prefix tuning parameters (type prefix).")
    prompt: VirtualTokenParams | None = Field(None, description="Prompt tuning parameters (type prompt).")
    ptuning: VirtualTokenParams | None = Field(None, description="P-tuning parameters (type ptuning).")


# ---- training ----------------------------------------------------------------------------------


class Hyperparameters(ApiModel):
    """Optimisation settings (transformers' TrainingArguments under the hood)."""

    epochs: float = Field(3, gt=0, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate; must be > 0.")
    batch_size_per_device: int = Field(
        4, ge=1, le=4096, description="Examples per GPU (or process) per step."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="Micro-batches per optimizer step."
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate."
    )
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmupRatio when > 0).")
    scheduler: Scheduler = Field("linear", description="Learning-rate schedule.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."
    )
    seed: int = Field(42, ge=0, description="Random seed (data order, initialisation).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")


class EarlyStopping(ApiModel):
    """Stop when the watched metric stops improving; the best checkpoint is kept."""

    metric: str = Field(
        "eval_loss",
        max_length=64,
        description="eval_loss, perplexity, or one of evaluation.metrics (e.g. exact_match).",
    )
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    threshold: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


def _default_metrics() -> list[Metric]:
    return ["perplexity"]


class Evaluation(ApiModel):
    """What to measure on the validation data, when, and when to stop early."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "!has(self.strategy) || self.strategy != 'steps' || has(self.everySteps)",
                "evaluation.strategy steps needs evaluation.everySteps (e.g. 200)",
            ),
            cel(
                "!has(self.earlyStopping) || !has(self.strategy) || self.strategy != 'no'",
                "evaluation.earlyStopping needs evaluations: set evaluation.strategy to auto, steps or epoch",
            ),
        )
    }

    metrics: list[Metric] = Field(
        default_factory=_default_metrics,
        max_length=16,
        description="Metrics computed at each evaluation.",
    )
    strategy: Literal["auto", "no", "steps", "epoch"] = Field(
        "auto",
        description="auto: every everySteps steps if set, else every epoch (when there is validation data).",
    )
    every_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps.")
    early_stopping: EarlyStopping | None = Field(None, description="Early stopping on a validation metric.")


class Resources(ApiModel):
    """How many machines and GPUs, and where they may run."""

    nodes: int = Field(
        1, ge=1, le=512, description="Training pods (machines); each runs one process per GPU."
    )
    gpus_per_node: int = Field(
        1, ge=0, le=16, description="GPUs per pod (0 = CPU training, for tests and tiny models)."
    )
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=253, description="Extended resource name of the GPUs (e.g. amd.com/gpu)."
    )
    cpu: str | None = Field(None, pattern=QUANTITY, description="CPU request per pod, e.g. 8.")
    memory: str | None = Field(
        None, pattern=QUANTITY, description="Memory request and limit per pod, e.g. 64Gi."
    )
    shared_memory_size: str | None = Field(
        None, pattern=QUANTITY, description="Size of /dev/shm (memory-backed), e.g. 16Gi. Default: no limit."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations (as in a Pod spec), e.g. for tainted GPU nodes."
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (as in a Pod spec).")
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(
        None, max_length=253, description="Scheduler for the pods (e.g. volcano)."
    )


class DeepSpeed(ApiModel):
    """DeepSpeed ZeRO: the config is generated from these fields; `config` overrides any key."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "!has(self.offload) || self.offload != 'all' || (has(self.zeroStage) && self.zeroStage == 3)",
                "distributed.deepspeed.offload all (parameters too) needs zeroStage 3; set zeroStage: 3 or offload: optimizer",
            ),
            cel(
                "!has(self.offload) || self.offload == 'none' || !has(self.zeroStage) || self.zeroStage >= 1",
                "distributed.deepspeed.offload needs zeroStage 1 or more",
            ),
        )
    }

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3 (3 shards parameters too).")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="CPU offload: optimizer states, or optimizer states and parameters (stage 3)."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config keys, deep-merged over the generated config."
    )


class Distributed(ApiModel):
    """How the processes train together."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "!has(self.deepspeed) || !has(self.strategy) || self.strategy == 'deepspeed'",
                "distributed.deepspeed (including offload) only applies with strategy deepspeed; "
                "remove it or set distributed.strategy: deepspeed",
            )
        )
    }

    strategy: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="deepspeed (ZeRO) or ddp (PyTorch DDP)."
    )
    deepspeed: DeepSpeed | None = Field(
        None, description="DeepSpeed settings (defaults: ZeRO-2, no offload)."
    )


class Checkpointing(ApiModel):
    """Checkpoints go to storage after every save; a new attempt resumes from the newest complete one."""

    every_steps: int | None = Field(
        None, ge=1, description="Save every N optimizer steps (default: every epoch)."
    )
    keep_last: int = Field(
        3, ge=1, le=1000, description="Checkpoints kept in storage (older ones are pruned)."
    )
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: resume from the newest complete checkpoint of this job; never: start over."
    )


class Storage(S3Connection):
    """Where checkpoints and the final adapter go: <uri>/<namespace>/<job>/<uid>/."""

    uri: str = Field(..., pattern=S3_URI, max_length=2048, description="s3://bucket[/prefix]")


class Output(ApiModel):
    """What the job produces besides the adapter (always written)."""

    merged_model: bool = Field(False, description="Also write the base model with the adapter merged in.")


class RunPolicy(ApiModel):
    """Restarts, deadlines, cleanup, pausing and queueing."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="New attempts after a failure (each resumes from the latest checkpoint). "
        "Failures in configuration or data are not retried.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it has been running longer than this (all attempts)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the FineTuneJob (and its pods) this long after it finished."
    )
    suspend: bool = Field(
        False, description="Pause: the pods stop (after saving a checkpoint); set false to resume from it."
    )
    queue_name: str | None = Field(
        None, max_length=63, description="Kueue LocalQueue; the job waits (Queued) until Kueue admits it."
    )


IMMUTABLE_WHILE_RUNNING = ("baseModel", "dataset", "method")


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, on which hardware, and where the results go."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "self.method.type != 'qlora' || self.resources.gpusPerNode > 0",
                "method.type qlora needs GPUs (its 4-bit kernels are CUDA-only): set resources.gpusPerNode >= 1, "
                "or use method.type lora for CPU training",
            ),
            cel(
                "!self.dataset.packing || !(self.method.type in ['prefix', 'prompt', 'ptuning'])",
                "dataset.packing does not work with virtual-token methods (prefix, prompt, ptuning): "
                "set dataset.packing: false or use lora, qlora or full",
            ),
            *(
                cel(
                    f"self.{f} == oldSelf.{f}",
                    f"spec.{f} is immutable: a running job cannot change it; create a new FineTuneJob instead",
                    field_path=f".{f}",
                    reason="FieldValueForbidden",
                )
                for f in IMMUTABLE_WHILE_RUNNING
            ),
        )
    }

    base_model: ModelSource = Field(..., description="The base model to fine-tune.")
    dataset: Dataset = Field(..., description="Training data and its preparation.")
    method: Method = Field(default_factory=Method, description="Fine-tuning method (default: LoRA r=8).")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Metrics and early stopping.")
    resources: Resources = Field(default_factory=Resources, description="Nodes, GPUs and scheduling.")
    distributed: Distributed = Field(default_factory=Distributed, description="DeepSpeed ZeRO or DDP.")
    checkpointing: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoints and resume.")
    storage: Storage = Field(..., description="S3-compatible storage for checkpoints and the final adapter.")
    output: Output = Field(default_factory=Output, description="Extra outputs.")
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Restarts, deadlines, suspend, Kueue."
    )
    image: str | None = Field(None, max_length=1024, description="Trainer image (default: the operator's).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the trainer image."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the trainer image."
    )
    env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment variables for the trainer."
    )
    pod_metadata: PodMetadata | None = Field(None, description="Extra labels and annotations for the pods.")


# ---- status ------------------------------------------------------------------------------------


class Progress(ApiModel):
    """Written by the trainer (rank 0) while it runs."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps in the whole run.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    percent: float | None = Field(None, ge=0, le=100, description="step / totalSteps, in percent.")
    train_loss: float | None = Field(None, description="Latest training loss.")
    eval_loss: float | None = Field(None, description="Latest validation loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput, all processes.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to the end.")
    updated_at: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="Time of this report."
    )


class CheckpointStatus(ApiModel):
    latest: str | None = Field(None, description="URI of the newest complete checkpoint.")
    step: int | None = Field(None, ge=0, description="Its step.")
    count: int | None = Field(None, ge=0, description="Complete checkpoints in storage.")


class OutputStatus(ApiModel):
    adapter_uri: str | None = Field(None, description="Where the final adapter is (PEFT format).")
    merged_uri: str | None = Field(
        None, description="Where the merged model is, when output.mergedModel is set."
    )
    trainable_parameters: int | None = Field(None, ge=0, description="Parameters trained.")
    total_parameters: int | None = Field(None, ge=0, description="Parameters of the model.")


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator (phase, conditions, output) and the trainer (progress)."""

    phase: Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"] | None = Field(
        None, description="Pending, Queued (waiting for Kueue), Running, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Details of the current state.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )
    start_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When training started."
    )
    completion_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the job finished."
    )
    attempt: int | None = Field(None, ge=1, description="Current attempt (1 + restarts so far).")
    workers: str | None = Field(None, description="nodes x GPUs per node, e.g. 2x8.")
    progress: Progress | None = Field(None, description="Training progress.")
    checkpoint: CheckpointStatus | None = Field(None, description="Checkpoints in storage.")
    output: OutputStatus | None = Field(None, description="Results.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Final evaluation metrics.")


class FineTuneJob(ApiModel):
    """A fine-tuning run: multi-GPU, multi-node training pods whose adapter lands in S3."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field("kubetune.io/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
