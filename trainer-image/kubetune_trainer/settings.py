"""The training settings, declared once for the FineTuneJob API and for the trainer.

Each block here is an `ApiModel` (kubetune_trainer.apimodel): camelCase aliases for manifests,
snake_case names for Python, bounds as pydantic constraints and cross-field checks as `Rule`s
(CEL for the API server plus their Python mirror). The operator puts these classes into the
FineTuneJob schema (kubetune_operator/api/finetunejob.py); `FinetuningConfig`
(kubetune_trainer/config.py) nests the method blocks as they are and takes its flat
guide-named fields (``learning_rate``, ``num_train_epochs`` ...) from them with `setting()`.
So a default, a bound, an enum or a description lives in exactly one place, below.

`TRAINING_RULES` are the FineTuneJob rules that concern training settings; the API attaches
them to the spec and FinetuningConfig runs the same checks on its own fields
(`FinetuningConfig.as_spec`), so both reject a bad setting with the same message.

Torch-free (pydantic only): the operator image ships this file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from kubetune_trainer.apimodel import (
    ApiModel,
    ListType,
    PreserveUnknownFields,
    Rule,
    cel_matches,
    matches,
    rules,
)

# ---- enumerations ------------------------------------------------------------------------------------

MethodType = Literal["lora", "qlora", "full", "prefix", "prompt", "ptuning"]
METHODS: tuple[str, ...] = get_args(MethodType)
PEFT_METHODS = frozenset({"lora", "qlora", "prefix", "prompt", "ptuning"})
VIRTUAL_TOKEN_METHODS: tuple[str, ...] = ("prefix", "prompt", "ptuning")
DataFormat = Literal["auto", "text", "instruction", "chat", "completion"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ModelDtype = Literal["auto", "bfloat16", "float16", "float32"]
Dedupe = Literal["none", "exact", "normalized"]
EvalStrategy = Literal["auto", "no", "steps", "epoch"]

Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "cosine_with_min_lr", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay",
]  # fmt: skip
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)

# The share of replay data when a replay source is given without a fraction (FineTuneJob's
# dataset.replay.fraction and FinetuningConfig.replay_fraction default to it).
REPLAY_FRACTION_DEFAULT = 0.1

# Metrics the evaluation package implements (here, torch-free, so the operator can validate a
# FineTuneJob without importing the evaluation code).
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
Metric = Literal[KNOWN_METRICS]  # type: ignore[valid-type]
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
# Early stopping may name them with or without the eval_ prefix Trainer adds.
WATCHABLE = [*WATCHABLE_METRICS, *(f"eval_{m}" for m in WATCHABLE_METRICS)]
ROUGE_PARTS = [*LOGGED_NAMES["rouge"], *(f"eval_{m}" for m in LOGGED_NAMES["rouge"])]

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

# Data augmentation (data/augment.py and the API's dataset.augmentation).
AUGMENT_MAX_VARIANTS = 16  # variants per example and method
AUGMENT_DEFAULT_FRACTION = 0.1
AUGMENT_DEFAULT_BATCH_SIZE = 8
AUGMENT_DEFAULT_MAX_NEW_TOKENS = 128
AUGMENT_PROMPT_DEFAULT = "{text}"
AUGMENT_PROMPT_MAX = 4096


@dataclass(frozen=True)
class Source:
    """Marks a FinetuningConfig field as the trainer's name for ``block.name`` (see `setting`)."""

    block: type[BaseModel]
    name: str


def setting(block: type[BaseModel], name: str) -> Any:
    """The declaration of ``block.name`` (default, bounds, description) for a field of another
    name: FinetuningConfig keeps the guide's flat names (``num_train_epochs``), the block keeps
    the declaration (``Hyperparameters.epochs``), and the FineTuneJob converter reads the
    `Source` marker to map one to the other."""
    info: FieldInfo = copy.copy(block.model_fields[name])
    info.alias = info.validation_alias = info.serialization_alias = None
    info.alias_priority = None
    info.metadata = [*info.metadata, Source(block, name)]
    return info


def sources(model: type[BaseModel]) -> dict[str, Source]:
    """The fields of ``model`` declared with `setting`, and where each is declared."""
    out = {}
    for field_name, info in model.model_fields.items():
        for m in info.metadata:
            if isinstance(m, Source):
                out[field_name] = m
    return out


# ---- the base model ----------------------------------------------------------------------------------

MODEL_DTYPE = Field(
    "auto",
    description="Data type the base model's weights are loaded in. auto: the training precision for "
    "adapter methods (bf16 or fp16 where used, else float32), float32 for full fine-tuning (mixed "
    "precision computes in half precision from float32 master weights).",
)


# ---- method blocks -----------------------------------------------------------------------------------


@rules(
    Rule(
        "!has(self.targetModules) || size(self.targetModules) > 0",
        "targetModules is an empty list: list module names (e.g. q_proj, v_proj) or [all-linear], or "
        "remove it to adapt the architecture's attention projections",
        check=lambda lo: lo.target_modules is None or len(lo.target_modules) > 0,
        field_path=".targetModules",
    ),
    Rule(
        "!has(self.targetModules) || !('all-linear' in self.targetModules) || size(self.targetModules) == 1",
        "targetModules: all-linear already covers every Linear layer; give it alone or list module "
        "names instead",
        check=lambda lo: (
            not lo.target_modules or "all-linear" not in lo.target_modules or len(lo.target_modules) == 1
        ),
        field_path=".targetModules",
    ),
)
class LoraParams(ApiModel):
    """Low-rank adapters on the model's linear layers."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the update matrices (4-64 typical).")
    alpha: float = Field(16, gt=0, le=100000, description="Scaling: updates are multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None,
        max_length=64,
        description="Module names to adapt (e.g. q_proj, v_proj) or [all-linear]; empty: the "
        "architecture's attention projections.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale updates by alpha / sqrt(r) instead of alpha / r."
    )

    @property
    def peft_target_modules(self) -> list[str] | str | None:
        """PEFT's spelling: the bare string 'all-linear', else the list (None: detect)."""
        return "all-linear" if self.target_modules == ["all-linear"] else self.target_modules


class QuantizationParams(ApiModel):
    """Quantization of the frozen base model (bitsandbytes), for QLoRA."""

    bits: Literal[4, 8] = Field(4, description="Quantization bits: 4 (NF4, the QLoRA recipe) or 8.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves memory).")
    compute_dtype: Precision = Field(
        "auto", description="Data type of the 4-bit matmuls; auto follows hyperparameters.precision."
    )


class QLoraParams(QuantizationParams, LoraParams):
    """LoRA on a 4-bit (or 8-bit) quantized base model. Needs NVIDIA GPUs."""


class _VirtualTokenParams(ApiModel):
    num_virtual_tokens: int = Field(
        20, ge=1, le=1024, description="Number of virtual tokens (the length of the prefix or soft prompt)."
    )


ENCODER_HIDDEN_SIZE = Field(
    None,
    ge=1,
    le=65536,
    description="Hidden size of the prefix MLP (prefix, with prefixProjection) or of the prompt encoder "
    "(ptuning); empty: the model's.",
)


class PrefixParams(_VirtualTokenParams):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    prefix_projection: bool = Field(False, description="Reparameterize the prefix with an MLP (more stable).")
    encoder_hidden_size: int | None = ENCODER_HIDDEN_SIZE


class PromptParams(_VirtualTokenParams):
    """Prompt tuning: a trainable soft prompt prepended to the input embeddings."""

    prompt_init_text: str | None = Field(
        None,
        max_length=4096,
        description="Initialize the soft prompt from this text (e.g. a task instruction); empty: random.",
    )


class PTuningParams(_VirtualTokenParams):
    """P-tuning: virtual tokens produced by a small trainable prompt encoder."""

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="Prompt encoder type.")
    encoder_hidden_size: int | None = ENCODER_HIDDEN_SIZE


class VirtualTokenParams(PTuningParams, PromptParams, PrefixParams):
    """The trainer's one block for prefix, prompt and P-tuning (each method reads its fields)."""


# ---- data options ------------------------------------------------------------------------------------


class DatasetOptions(ApiModel):
    """How the data is prepared: the declarations the API's dataset block and FinetuningConfig take
    with `setting()` (each keeps its own field order)."""

    validation_split: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Hold out this fraction of the training data for validation (deterministic, by seed). "
        "Range (0, 0.5].",
    )
    max_seq_length: int = Field(
        1024, ge=8, le=1048576, description="Longest example in tokens; longer ones are dropped."
    )
    packing: bool | None = Field(
        None,
        description="Pack several examples into each padding-free sequence (lora, qlora and full only). "
        "Unset: packed where a variable-length attention kernel makes that the faster layout (CUDA with "
        "flash-attn), length-grouped padded batches elsewhere (faster on CPU; docs/benchmarks.md).",
    )
    dedupe: Dedupe = Field(
        "exact",
        description="Drop duplicate examples: exact (same text) or normalized (ignoring case, spaces and "
        "punctuation); none keeps them.",
    )


# ---- data augmentation -------------------------------------------------------------------------------
# The settings of each method. Where its inputs live is the one difference between the API and the
# trainer: the API's blocks add URIs (synonyms.file, model: hf://, s3://, pvc://, file://) in
# kubetune_operator/api/finetunejob.py, the trainer's add the local paths, s3:// URIs or hub ids the
# converter resolves them to (kubetune_trainer/config.py).


def _prompt_rule(field: str) -> Rule:
    return Rule(
        "self.contains('{text}')",
        f"{field} must contain {{text}}, where the text to rewrite goes (e.g. 'paraphrase: {{text}}')",
        check=lambda v: "{text}" in v,
    )


VARIANTS = Field(1, ge=1, le=AUGMENT_MAX_VARIANTS, description="Variants made from each training example.")
INCLUDE_RESPONSE = Field(
    False, description="Also rewrite the trained response (output, completion, assistant turns)."
)


class SynonymOptions(ApiModel):
    """Synonym replacement from the built-in Moby thesaurus (offline) or your own synonyms file."""

    fraction: float = Field(
        AUGMENT_DEFAULT_FRACTION,
        gt=0,
        le=1,
        description="Share of the words that have a synonym replaced in each variant (at least one word).",
    )
    variants: int = VARIANTS
    include_response: bool = INCLUDE_RESPONSE


@rules(
    Rule(
        "!has(self.maxVariants) || self.maxVariants >= self.variants",
        "maxVariants is below variants: raise maxVariants or lower variants",
        check=lambda m: m.max_variants is None or m.max_variants >= m.variants,
        field_path=".maxVariants",
    )
)
class _ModelAugmentation(ApiModel):
    variants: int = VARIANTS
    max_variants: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="Cap on the variants this method makes for the whole training set.",
    )
    batch_size: int = Field(
        AUGMENT_DEFAULT_BATCH_SIZE, ge=1, le=1024, description="Texts the model rewrites at once."
    )
    max_new_tokens: int = Field(
        AUGMENT_DEFAULT_MAX_NEW_TOKENS, ge=1, le=4096, description="Longest rewrite, in tokens."
    )
    include_response: bool = INCLUDE_RESPONSE


class ParaphraseOptions(_ModelAugmentation):
    """Paraphrases by a model you name (seq2seq or causal, loaded with transformers)."""

    prompt: Annotated[str, _prompt_rule("dataset.augmentation.paraphrase.prompt")] = Field(
        AUGMENT_PROMPT_DEFAULT,
        max_length=AUGMENT_PROMPT_MAX,
        description="The model's input; {text} is replaced by the text to paraphrase.",
    )


class BackTranslationOptions(_ModelAugmentation):
    """Back-translation: model translates into a pivot language, backModel translates back."""

    prompt: Annotated[str, _prompt_rule("dataset.augmentation.backTranslation.prompt")] = Field(
        AUGMENT_PROMPT_DEFAULT,
        max_length=AUGMENT_PROMPT_MAX,
        description="Input of model; {text} is the text.",
    )
    back_prompt: Annotated[str, _prompt_rule("dataset.augmentation.backTranslation.backPrompt")] = Field(
        AUGMENT_PROMPT_DEFAULT,
        max_length=AUGMENT_PROMPT_MAX,
        description="Input of backModel; {text} is the translation.",
    )


SynonymsT = TypeVar("SynonymsT", bound=SynonymOptions)
ParaphraseT = TypeVar("ParaphraseT", bound=ParaphraseOptions)
BackTranslationT = TypeVar("BackTranslationT", bound=BackTranslationOptions)


@rules(
    Rule(
        "has(self.synonyms) || has(self.paraphrase) || has(self.backTranslation)",
        "dataset.augmentation needs at least one method: set synonyms, paraphrase or backTranslation "
        "(or remove augmentation)",
        check=lambda a: a.synonyms is not None or a.paraphrase is not None or a.back_translation is not None,
        reason="FieldValueRequired",
    )
)
class AugmentationMethods(ApiModel, Generic[SynonymsT, ParaphraseT, BackTranslationT]):
    """The augmentation block, over each side's method blocks (API: URIs; trainer: local paths)."""

    synonyms: SynonymsT | None = Field(None, description="Synonym replacement.")
    paraphrase: ParaphraseT | None = Field(None, description="Paraphrasing by a model.")
    back_translation: BackTranslationT | None = Field(
        None, description="Back-translation through a pivot language by two models."
    )


# ---- hyperparameters ---------------------------------------------------------------------------------


class Hyperparameters(ApiModel):
    """Optimization settings (transformers' TrainingArguments under the hood)."""

    epochs: float = Field(3, gt=0, le=1000, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(
        None, ge=1, le=100000000, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(
        2e-4,
        gt=0,
        le=1,
        description="Peak learning rate, > 0 (2e-4 suits LoRA; full fine-tuning wants ~1e-5).",
    )
    batch_size_per_device: int = Field(
        4, ge=1, le=4096, description="Examples per GPU (or process) per step."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="Micro-batches per optimizer step."
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Fraction of the steps spent warming up the learning rate."
    )
    warmup_steps: int = Field(
        0, ge=0, le=100000000, description="Warm-up steps (overrides warmupRatio when > 0)."
    )
    scheduler: Scheduler = Field("linear", description="Learning-rate schedule.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm (0 = off).")
    precision: Precision = Field(
        "auto",
        description="auto: bf16 where the GPU supports it (fp16 on older GPUs) and on CPUs that compute it "
        "natively (AMX or AVX-512 BF16), fp32 on other CPUs.",
    )
    seed: int = Field(
        42, ge=0, le=4294967295, description="Random seed (data order, initialization, splits)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations to save memory on long sequences."
    )


# ---- evaluation --------------------------------------------------------------------------------------


@rules(
    Rule(
        f"self.metric in {WATCHABLE}",
        "evaluation.earlyStopping.metric must be a number evaluation logs: eval_loss, perplexity or one of "
        + ", ".join(m for m in WATCHABLE_METRICS if m not in ("loss", "perplexity"))
        + " (rouge is logged as rouge1/rouge2/rougeL; confusion_matrix is a matrix, not a number)",
        check=lambda e: e.metric in WATCHABLE,
        field_path=".metric",
    ),
)
class EarlyStopping(ApiModel):
    """Stop when the watched metric stops improving; the best checkpoint is kept."""

    metric: str = Field(
        "eval_loss",
        max_length=64,
        description="Metric to watch: eval_loss, perplexity, or one of evaluation.metrics (e.g. exact_match).",
    )
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    threshold: float = Field(0.0, ge=0, le=1e9, description="Smallest change that counts as an improvement.")


def _default_metrics() -> list[Metric]:
    return ["perplexity"]


def _metric_is_computed(ev: Any) -> bool:
    if ev.early_stopping is None:
        return True
    m = ev.early_stopping.metric
    return (
        m in ("loss", "eval_loss", "perplexity", "eval_perplexity")
        or any(m in (x, f"eval_{x}") for x in ev.metrics)
        or (m in ROUGE_PARTS and "rouge" in ev.metrics)
    )


@rules(
    Rule(
        "self.strategy != 'steps' || has(self.everySteps)",
        "evaluation.strategy steps needs evaluation.everySteps (e.g. 200)",
        check=lambda e: e.strategy != "steps" or e.every_steps is not None,
        field_path=".everySteps",
        reason="FieldValueRequired",
    ),
    Rule(
        "!has(self.earlyStopping) || self.strategy != 'no'",
        "evaluation.earlyStopping needs evaluations: set evaluation.strategy to auto, steps or epoch",
        check=lambda e: e.early_stopping is None or e.strategy != "no",
        field_path=".earlyStopping",
        reason="FieldValueForbidden",
    ),
    Rule(
        "!has(self.earlyStopping) || self.earlyStopping.metric in ['loss', 'eval_loss', 'perplexity', "
        "'eval_perplexity'] || self.metrics.exists(m, self.earlyStopping.metric == m || "
        f"self.earlyStopping.metric == 'eval_' + m) || (self.earlyStopping.metric in {ROUGE_PARTS} && "
        "'rouge' in self.metrics)",
        "evaluation.earlyStopping.metric is not computed: use eval_loss or perplexity, or add the metric to "
        "evaluation.metrics",
        check=_metric_is_computed,
        field_path=".earlyStopping.metric",
    ),
    Rule(
        "!('semantic_similarity' in self.metrics) || has(self.semanticModel)",
        "evaluation.metrics semantic_similarity needs evaluation.semanticModel: a sentence-transformers model "
        "name or a model directory in the trainer image (e.g. sentence-transformers/all-MiniLM-L6-v2)",
        check=lambda e: "semantic_similarity" not in e.metrics or e.semantic_model is not None,
        field_path=".semanticModel",
        reason="FieldValueRequired",
    ),
)
class Evaluation(ApiModel):
    """What to measure on the validation data, when, and when to stop early."""

    metrics: Annotated[list[Metric], ListType("set")] = Field(
        default_factory=_default_metrics,
        max_length=16,
        description="Metrics computed at each evaluation (generation metrics such as bleu or exact_match "
        "generate text for each validation example).",
    )
    strategy: EvalStrategy = Field(
        "auto",
        description="When to evaluate. auto: every everySteps steps if set, else every epoch, and never without "
        'validation data. Write "no" in quotes: bare no is a boolean in YAML.',
    )
    every_steps: int | None = Field(None, ge=1, le=100000000, description="Evaluate every N optimizer steps.")
    early_stopping: EarlyStopping | None = Field(
        None, description="Early stopping on a validation metric (needs validation data)."
    )
    semantic_model: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Embedding model for the semantic_similarity metric: a sentence-transformers model name "
        "(the pod needs hub access or a model cache) or a model directory inside the trainer image. The image "
        "needs the sentence-transformers package (kubetune[semantic]).",
    )


# ---- checkpointing and DeepSpeed ---------------------------------------------------------------------


class Checkpointing(ApiModel):
    """Checkpoints go to storage after every save; a new attempt resumes from the newest complete one."""

    every_steps: int | None = Field(
        None,
        ge=1,
        le=100000000,
        description="Save every N optimizer steps; empty: at the end of every epoch.",
    )
    keep_last: int = Field(
        3, ge=1, le=1000, description="Checkpoints kept in storage (older ones are pruned)."
    )
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: resume from the newest complete checkpoint of this job; never: start over."
    )


@rules(
    Rule(
        "self.offload != 'all' || self.zeroStage == 3",
        "distributed.deepspeed.offload all (parameters too) needs zeroStage 3: set zeroStage: 3 or offload: "
        "optimizer",
        check=lambda d: d.offload != "all" or d.zero_stage == 3,
        field_path=".offload",
    ),
    Rule(
        "self.offload == 'none' || self.zeroStage >= 1",
        "distributed.deepspeed.offload needs zeroStage 1 or more (ZeRO-0 has no optimizer state to offload): "
        "raise zeroStage or set offload: none",
        check=lambda d: d.offload == "none" or d.zero_stage >= 1,
        field_path=".offload",
    ),
)
class DeepSpeed(ApiModel):
    """DeepSpeed ZeRO. The DeepSpeed config is generated from these fields; `config` overrides any key."""

    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="ZeRO stage 0-3: 1 shards optimizer states, 2 also gradients, 3 also parameters.",
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description="CPU offload: none, optimizer (states; stage >= 1), or all (optimizer and parameters; stage 3).",
    )
    # `config` in manifests; `overrides` in Python and FinetuningConfig YAML.
    overrides: Annotated[dict[str, Any], PreserveUnknownFields()] | None = Field(
        None,
        alias="config",
        description="Raw DeepSpeed config keys, deep-merged over the generated config (free-form; e.g. "
        "{zero_optimization: {overlap_comm: true}}).",
    )


# ---- the cross-field rules of training settings ------------------------------------------------------
# Their checks read a FineTuneJob spec, or the same shape that FinetuningConfig.as_spec() builds
# from a trainer config: method.type, dataset.(packing, validation, validationSplit, replay),
# evaluation, checkpointing.everySteps, distributed, output.mergedModel, baseModel.initAdapter.


def zero3(spec: Any) -> bool:
    d = spec.distributed
    return d.strategy == "deepspeed" and d.deepspeed is not None and d.deepspeed.zero_stage == 3


# CEL for the same question (a missing deepspeed block means ZeRO-2).
ZERO3 = (
    "(self.distributed.strategy == 'deepspeed' && has(self.distributed.deepspeed) "
    "&& self.distributed.deepspeed.zeroStage == 3)"
)


# When the trainer evaluates (FinetuningConfig.resolved_eval_strategy): auto means every
# evaluation.everySteps steps when that is set, else every epoch. The validation data that auto
# also needs is checked by its own rule.
def _eval_every_steps(ev: Any) -> bool:
    return ev.strategy in ("auto", "steps") and ev.every_steps is not None


def _eval_every_epoch(ev: Any) -> bool:
    return ev.strategy == "epoch" or (ev.strategy == "auto" and ev.every_steps is None)


EVAL_EVERY_STEPS = "(self.evaluation.strategy in ['auto', 'steps'] && has(self.evaluation.everySteps))"
EVAL_EVERY_EPOCH = (
    "(self.evaluation.strategy == 'epoch' || (self.evaluation.strategy == 'auto' && "
    "!has(self.evaluation.everySteps)))"
)

DATASET_RULES: tuple[Rule, ...] = (
    Rule(
        "has(self.train) || (has(self.mixture) && size(self.mixture) > 0)",
        "dataset needs training data: set dataset.train.uri, or dataset.mixture with one or more sources",
        check=lambda d: d.train is not None or bool(d.mixture),
        reason="FieldValueRequired",
    ),
    Rule(
        "!(has(self.validation) && has(self.validationSplit))",
        "set dataset.validation or dataset.validationSplit, not both",
        check=lambda d: d.validation is None or d.validation_split is None,
        field_path=".validationSplit",
        reason="FieldValueForbidden",
    ),
)

TRAINING_RULES: tuple[Rule, ...] = (
    Rule(
        "!has(self.dataset.packing) || !self.dataset.packing "
        "|| !(self.method.type in ['prefix', 'prompt', 'ptuning'])",
        "dataset.packing does not work with virtual-token methods (prefix, prompt, ptuning): set "
        "dataset.packing: false or use lora, qlora or full",
        check=lambda s: not s.dataset.packing or s.method.type not in VIRTUAL_TOKEN_METHODS,
        field_path=".dataset.packing",
    ),
    Rule(
        "!has(self.evaluation.earlyStopping) || has(self.dataset.validation) || has(self.dataset.validationSplit)",
        "evaluation.earlyStopping needs validation data: set dataset.validation or dataset.validationSplit",
        check=lambda s: (
            s.evaluation.early_stopping is None
            or s.dataset.validation is not None
            or s.dataset.validation_split is not None
        ),
        field_path=".evaluation.earlyStopping",
        reason="FieldValueForbidden",
    ),
    # Early stopping keeps the best checkpoint, so the trainer refuses to start unless a checkpoint
    # is saved at every evaluation (kubetune_trainer.training.best_model_settings).
    Rule(
        f"!has(self.evaluation.earlyStopping) || !has(self.checkpointing.everySteps) || !{EVAL_EVERY_STEPS} "
        "|| self.checkpointing.everySteps % self.evaluation.everySteps == 0",
        "evaluation.earlyStopping keeps the best checkpoint, so checkpoints must be saved at evaluations: make "
        "checkpointing.everySteps a multiple of evaluation.everySteps, or remove it (checkpoints then follow "
        "the evaluations)",
        check=lambda s: (
            s.evaluation.early_stopping is None
            or s.checkpointing.every_steps is None
            or not _eval_every_steps(s.evaluation)
            or s.checkpointing.every_steps % s.evaluation.every_steps == 0
        ),
        field_path=".checkpointing.everySteps",
    ),
    Rule(
        f"!has(self.evaluation.earlyStopping) || !has(self.checkpointing.everySteps) || !{EVAL_EVERY_EPOCH}",
        "evaluation.earlyStopping with evaluations every epoch needs checkpoints every epoch: remove "
        "checkpointing.everySteps, or evaluate every N steps (evaluation.everySteps, a divisor of "
        "checkpointing.everySteps, with evaluation.strategy auto or steps)",
        check=lambda s: (
            s.evaluation.early_stopping is None
            or s.checkpointing.every_steps is None
            or not _eval_every_epoch(s.evaluation)
        ),
        field_path=".checkpointing.everySteps",
    ),
    Rule(
        "!self.output.mergedModel || self.method.type in ['lora', 'qlora']",
        "output.mergedModel merges a LoRA adapter into the base weights: it works only with method.type lora "
        "or qlora; set it to false",
        check=lambda s: not s.output.merged_model or s.method.type in ("lora", "qlora"),
        field_path=".output.mergedModel",
    ),
    Rule(
        f"self.method.type != 'qlora' || !{ZERO3}",
        "method.type qlora cannot shard its 4-bit weights with ZeRO-3: set distributed.deepspeed.zeroStage "
        "to 2 or less",
        check=lambda s: s.method.type != "qlora" or not zero3(s),
        field_path=".distributed",
    ),
    Rule(
        "!has(self.baseModel.initAdapter) || self.method.type != 'full'",
        "baseModel.initAdapter continues a PEFT adapter, and method.type full trains no adapter: set "
        "method.type to the adapter's method (lora, qlora, prefix, prompt or ptuning) or remove initAdapter",
        check=lambda s: s.base_model.init_adapter is None or s.method.type != "full",
        field_path=".baseModel.initAdapter",
    ),
    Rule(
        f"!has(self.dataset.replay) || self.dataset.replay.ewcLambda == 0.0 || !{ZERO3}",
        "dataset.replay.ewcLambda > 0 (elastic weight consolidation) does not work with ZeRO-3 (parameters are "
        "sharded): set ewcLambda to 0 or zeroStage to 2 or less",
        check=lambda s: s.dataset.replay is None or s.dataset.replay.ewc_lambda == 0 or not zero3(s),
        field_path=".dataset.replay.ewcLambda",
    ),
)


# ---- experiment tracking -----------------------------------------------------------------------------
# The API's tracking block (reportTo, mlflow) and FinetuningConfig's report_to / mlflow share these
# rules. The API alone requires an http(s) server for mlflow (a pod's local MLflow files are lost with
# the pod); the trainer also runs on a laptop, where MLflow's local ./mlruns is a fine default.

# scheme://user:password@host: credentials belong in a Secret (or the environment), not in the URI.
URI_WITH_USERINFO = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@"

MLFLOW_URI_WITHOUT_CREDENTIALS = Rule(
    f"!{cel_matches('self', URI_WITH_USERINFO)}",
    "tracking.mlflow.trackingUri must not contain credentials (user:password@): put them in a Secret "
    "and name it in tracking.mlflow.credentialsSecretRef",
    check=lambda v: not matches(v, URI_WITH_USERINFO),
)

MLFLOW_EXPERIMENT = Field(
    None,
    min_length=1,
    max_length=256,
    description="Experiment the run goes into (created when missing). Empty: MLflow's Default experiment.",
)

MLFLOW_NEEDS_REPORT_TO = Rule(
    "!has(self.mlflow) || (has(self.reportTo) && 'mlflow' in self.reportTo)",
    "tracking.mlflow is set but tracking.reportTo does not name mlflow: add mlflow to tracking.reportTo",
    check=lambda t: t.mlflow is None or "mlflow" in (t.report_to or []),
    field_path=".reportTo",
)
