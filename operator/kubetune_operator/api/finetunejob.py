"""FineTuneJob (kubetune.io/v1alpha1): one fine-tuning run, from base model and data to an adapter in S3.

The shortest useful job names a base model, training data and storage; everything else has a
default the API server fills in (LoRA r=8, 3 epochs, learning rate 2e-4, one node with one GPU).
The defaults are the trainer's own (kubetune_trainer.config), so a job behaves the same whether
the API server defaulted it or `kubetune run --local` read it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from kubetune_trainer.apimodel import (
    ApiModel,
    KindModel,
    ListType,
    Rule,
    immutable,
    rules,
)
from kubetune_trainer.settings import (
    DATASET_RULES,
    MLFLOW_EXPERIMENT,
    MLFLOW_NEEDS_REPORT_TO,
    MLFLOW_URI_WITHOUT_CREDENTIALS,
    MODEL_DTYPE,
    REPLAY_FRACTION_DEFAULT,
    REPORT_TO,
    TRAINING_RULES,
    AugmentationMethods,
    BackTranslationOptions,
    Checkpointing,
    DataFormat,
    DatasetOptions,
    Dedupe,
    DeepSpeed,
    Evaluation,
    Hyperparameters,
    LoraParams,
    MethodType,
    ModelDtype,
    ParaphraseOptions,
    PrefixParams,
    PromptParams,
    PTuningParams,
    QLoraParams,
    SynonymOptions,
    setting,
)

from .common import (
    DNS1123_SUBDOMAIN,
    HTTP_URL,
    RESOURCE_NAME,
    S3_URI,
    URI_MAX,
    Conditions,
    EnvList,
    FreeForm,
    LocalObjectReference,
    ModelSource,
    PodMetadata,
    Quantity,
    S3Connection,
    Timestamp,
    Toleration,
    data_uri_rule,
    model_uri_rule,
    pattern_rule,
)

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


# ---- base model ----------------------------------------------------------------------------------


@rules(
    Rule(
        "has(self.uri) != has(self.fineTuneJobRef)",
        "baseModel.initAdapter needs exactly one of uri (an adapter directory: s3://, hf://, pvc:// or file://) "
        "or fineTuneJobRef (a FineTuneJob in this namespace whose adapter to continue)",
        check=lambda a: (a.uri is None) != (a.fine_tune_job_ref is None),
    ),
)
class InitAdapter(ApiModel):
    """An existing adapter to continue training instead of starting a new one (continual learning)."""

    uri: Annotated[str, model_uri_rule("baseModel.initAdapter.uri")] | None = Field(
        None,
        max_length=URI_MAX,
        description="Adapter directory (adapter_config.json + weights): s3://bucket/path/ (read with this job's "
        "storage credentials), hf://org/name, pvc://claim/path or file:///path.",
    )
    fine_tune_job_ref: LocalObjectReference | None = Field(
        None,
        description="A FineTuneJob in this namespace: training starts from its adapter "
        "(status.output.adapterUri) once it has Succeeded; until then this job waits.",
    )


class FineTuneBaseModel(ModelSource):
    """The base model to fine-tune and, optionally, the adapter to continue."""

    dtype: ModelDtype = MODEL_DTYPE

    init_adapter: InitAdapter | None = Field(
        None,
        description="Continue training this adapter (same base model, same method type) instead of a new one.",
    )


# ---- data --------------------------------------------------------------------------------------


class DataSource(ApiModel):
    """A dataset file: a JSON array or JSON Lines (CSV and Parquet work too)."""

    uri: Annotated[str, data_uri_rule("dataset uri")] = Field(
        max_length=URI_MAX,
        description="s3://bucket/key.jsonl, pvc://claim/path/file.jsonl, file:///path inside the image, or a "
        "path relative to the manifest (kubetune run --local only).",
    )
    format: DataFormat = Field(
        "auto",
        description="Record layout: text {text}, instruction {instruction, input, output}, chat {messages} "
        "or ShareGPT {conversations}, "
        "completion {prompt, completion}; auto: detected from the records' keys.",
    )


class MixtureSource(DataSource):
    """One task of a multi-task mixture."""

    weight: float = Field(1.0, gt=0, le=1000, description="Relative sampling weight of this source.")


class Replay(ApiModel):
    """Continual learning: data from earlier tasks is mixed back in so the model does not forget them."""

    uri: Annotated[str, data_uri_rule("dataset.replay.uri")] = Field(
        max_length=URI_MAX, description="Data of the earlier task(s), in any dataset format."
    )
    fraction: float = Field(
        REPLAY_FRACTION_DEFAULT,
        gt=0,
        lt=1,
        description="Share of the training mix (so of every epoch) drawn from the replay data: 0.2 with "
        "1,000 new examples adds 250 replay examples (20% of 1,250). Must be below 1.",
    )
    ewc_lambda: float = Field(
        0.0,
        ge=0,
        le=1e9,
        description="Elastic weight consolidation strength (0 = off). The Fisher information is estimated on "
        "the replay data. Not available with ZeRO-3.",
    )


class SynonymAugmentation(SynonymOptions):
    """Synonym replacement from the built-in Moby thesaurus (offline) or your own synonyms file."""

    file: Annotated[str, data_uri_rule("dataset.augmentation.synonyms.file")] | None = Field(
        None,
        max_length=URI_MAX,
        description="Your synonyms: JSON {word: [synonyms]} or one 'word,synonym,...' line per word. "
        "Default: the built-in Moby thesaurus.",
    )


class ParaphraseAugmentation(ParaphraseOptions):
    """Paraphrases by a model you name (seq2seq or causal, loaded with transformers)."""

    model: Annotated[str, model_uri_rule("dataset.augmentation.paraphrase.model")] = Field(
        max_length=URI_MAX, description="The paraphrase model: hf://org/name, s3://, pvc:// or file://."
    )


class BackTranslationAugmentation(BackTranslationOptions):
    """Back-translation: model translates into a pivot language, backModel translates back."""

    model: Annotated[str, model_uri_rule("dataset.augmentation.backTranslation.model")] = Field(
        max_length=URI_MAX, description="Into the pivot language: hf://org/name, s3://, pvc:// or file://."
    )
    back_model: Annotated[str, model_uri_rule("dataset.augmentation.backTranslation.backModel")] = Field(
        max_length=URI_MAX,
        description="From the pivot language back: hf://org/name, s3://, pvc:// or file://.",
    )


class Augmentation(
    AugmentationMethods[SynonymAugmentation, ParaphraseAugmentation, BackTranslationAugmentation]
):
    """More training examples made from the training split (never from validation or test data)."""


@rules(*DATASET_RULES)
class Dataset(ApiModel):
    """Training, validation and test data, and how it is prepared."""

    train: DataSource | None = Field(None, description="Training data (or use mixture).")
    validation: DataSource | None = Field(
        None, description="Validation data, for evaluation during training and early stopping."
    )
    validation_split: float | None = setting(DatasetOptions, "validation_split")
    test: DataSource | None = Field(None, description="Held-out test data, evaluated once after training.")
    max_seq_length: int = setting(DatasetOptions, "max_seq_length")
    packing: bool | None = setting(DatasetOptions, "packing")
    dedupe: Dedupe = setting(DatasetOptions, "dedupe")
    mixture: list[MixtureSource] | None = Field(
        None,
        max_length=32,
        description="Multi-task training: several sources sampled by weight (alone or together with train).",
    )
    replay: Replay | None = Field(None, description="Continual learning replay data.")
    augmentation: Augmentation | None = Field(
        None,
        description="Data augmentation of the training split: synonyms, paraphrase, backTranslation. Counts "
        "appear in status.output.augmentation.",
    )


# ---- method ------------------------------------------------------------------------------------


def _block_matches(block: str, types: tuple[str, ...]) -> Rule:
    return Rule(
        f"!has(self.{block}) || self.type in {list(types)}",
        f"method.{block} only applies to method.type {' or '.join(types)}: remove method.{block} "
        f"or set method.type to {types[0]}",
        check=lambda m: getattr(m, block) is None or m.type in types,
        field_path=f".{block}",
        reason="FieldValueForbidden",
    )


@rules(
    _block_matches("lora", ("lora",)),
    _block_matches("qlora", ("qlora",)),
    _block_matches("prefix", ("prefix",)),
    _block_matches("prompt", ("prompt",)),
    _block_matches("ptuning", ("ptuning",)),
)
class Method(ApiModel):
    """The fine-tuning method; its parameters go in the block named like the type (optional)."""

    type: MethodType = Field(
        "lora",
        description="lora (default), qlora (LoRA on a 4-bit base; GPUs only), full (all weights), prefix, "
        "prompt or ptuning (virtual tokens).",
    )
    lora: LoraParams | None = Field(None, description="LoRA parameters (type lora; defaults: r 8, alpha 16).")
    qlora: QLoraParams | None = Field(
        None, description="QLoRA parameters (type qlora): LoRA's plus quantization."
    )
    prefix: PrefixParams | None = Field(None, description="Prefix tuning parameters (type prefix).")
    prompt: PromptParams | None = Field(None, description="Prompt tuning parameters (type prompt).")
    ptuning: PTuningParams | None = Field(None, description="P-tuning parameters (type ptuning).")


# ---- training ------------------------------------------------------------------------------------


class Resources(ApiModel):
    """How many machines and GPUs, and where they may run."""

    # A running Job's parallelism and pod template cannot change, and the operator reads these
    # two from the live spec: both are fixed for the life of the FineTuneJob.
    nodes: Annotated[
        int,
        immutable(
            "spec.resources.nodes is immutable: the training Job is sized for it; "
            "create a new FineTuneJob to train on a different number of nodes"
        ),
    ] = Field(1, ge=1, le=512, description="Training pods (machines), >= 1; each runs one process per GPU.")
    gpus_per_node: Annotated[
        int,
        immutable(
            "spec.resources.gpusPerNode is immutable: the training Job is sized for it; "
            "create a new FineTuneJob to train on a different number of GPUs"
        ),
    ] = Field(1, ge=0, le=16, description="GPUs per pod, 0-16 (0 = CPU training, for tests and tiny models).")
    gpu_resource_name: Annotated[
        str,
        pattern_rule(
            RESOURCE_NAME,
            "resources.gpuResourceName must be an extended resource name such as nvidia.com/gpu",
        ),
    ] = Field(
        "nvidia.com/gpu", max_length=253, description="Extended resource name of the GPUs (e.g. amd.com/gpu)."
    )
    cpu: Quantity | None = Field(None, description="CPU request per pod, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod, e.g. 64Gi.")
    shared_memory_size: Quantity | None = Field(
        None,
        description="Size limit of /dev/shm (memory-backed; NCCL needs it), e.g. 16Gi. Default: no limit.",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="Node labels the pods require, e.g. a GPU product label."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=32, description="Pod tolerations, e.g. for tainted GPU nodes."
    )
    affinity: FreeForm | None = Field(
        None, description="Pod affinity, exactly as spec.affinity in a Pod spec; passed through unchanged."
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(
        None, max_length=253, description="Scheduler for the pods (e.g. volcano); default: the cluster's."
    )


@rules(
    Rule(
        "!has(self.deepspeed) || self.strategy == 'deepspeed'",
        "distributed.deepspeed (zeroStage, offload, config) only applies with strategy deepspeed: remove it "
        "or set distributed.strategy: deepspeed",
        check=lambda d: d.deepspeed is None or d.strategy == "deepspeed",
        field_path=".deepspeed",
        reason="FieldValueForbidden",
    ),
)
class Distributed(ApiModel):
    """How the training processes work together (torchrun starts them in every pod)."""

    strategy: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="deepspeed (ZeRO; default stage 2) or ddp (PyTorch DistributedDataParallel)."
    )
    deepspeed: DeepSpeed | None = Field(
        None, description="DeepSpeed settings; empty: ZeRO-2 without offload."
    )


class Storage(S3Connection):
    """Where checkpoints and the final adapter go: <uri>/<namespace>/<job>/<uid>/."""

    uri: Annotated[
        str,
        pattern_rule(
            S3_URI,
            "storage.uri must look like s3://bucket or s3://bucket/prefix (bucket: 3-63 "
            "lowercase letters, digits, '.' or '-')",
        ),
        immutable(
            "spec.storage.uri is immutable: the job's checkpoints live there; create a new FineTuneJob "
            "to write elsewhere"
        ),
    ] = Field(
        max_length=URI_MAX, description="s3://bucket[/prefix] for checkpoints, the adapter and metrics."
    )


class Output(ApiModel):
    """What the job produces besides the adapter (always written)."""

    merged_model: bool = Field(
        False, description="Also write the base model with the adapter merged in (lora and qlora only)."
    )


# ---- tracking ----------------------------------------------------------------------------------

# The trainer's list of transformers' reporting integrations (kubetune_trainer.config.REPORT_TO).
ReportTo = Literal[REPORT_TO]  # type: ignore[valid-type]


class MlflowCredentials(ApiModel):
    """A Secret (same namespace) with the MLflow server's credentials. The pods get each key as the
    environment variable MLflow's client reads; keys missing from the Secret are left out."""

    name: Annotated[
        str,
        pattern_rule(
            DNS1123_SUBDOMAIN,
            "tracking.mlflow.credentialsSecretRef.name must be the name of a Secret (a lowercase DNS subdomain)",
        ),
    ] = Field(max_length=253, description="Name of the Secret (same namespace).")
    username_key: str = Field(
        "MLFLOW_TRACKING_USERNAME",
        max_length=253,
        description="Key holding the user name (basic auth): becomes MLFLOW_TRACKING_USERNAME.",
    )
    password_key: str = Field(
        "MLFLOW_TRACKING_PASSWORD",
        max_length=253,
        description="Key holding the password (basic auth): becomes MLFLOW_TRACKING_PASSWORD.",
    )
    token_key: str = Field(
        "MLFLOW_TRACKING_TOKEN",
        max_length=253,
        description="Key holding a bearer token (instead of user and password): becomes MLFLOW_TRACKING_TOKEN.",
    )


class Mlflow(ApiModel):
    """The MLflow tracking server that receives the run (one MLflow run per attempt)."""

    tracking_uri: Annotated[
        str,
        pattern_rule(
            HTTP_URL,
            "tracking.mlflow.trackingUri must be an http:// or https:// URL, e.g. http://mlflow.mlflow.svc:5000",
        ),
        MLFLOW_URI_WITHOUT_CREDENTIALS,
    ] = Field(
        max_length=URI_MAX, description="MLflow tracking server URL, e.g. http://mlflow.mlflow.svc:5000."
    )
    experiment: str | None = MLFLOW_EXPERIMENT
    credentials_secret_ref: MlflowCredentials | None = Field(
        None, description="Secret with the server's credentials. Empty: no authentication."
    )


@rules(
    MLFLOW_NEEDS_REPORT_TO,
    Rule(
        "!has(self.reportTo) || !('mlflow' in self.reportTo) || has(self.mlflow)",
        "tracking.reportTo mlflow needs a server: set tracking.mlflow.trackingUri (a pod's local MLflow files "
        "would be lost with the pod)",
        check=lambda t: "mlflow" not in (t.report_to or []) or t.mlflow is not None,
        field_path=".mlflow",
        reason="FieldValueRequired",
    ),
)
class Tracking(ApiModel):
    """Experiment trackers that receive the training logs (loss, learning rate, evaluations) from rank 0.

    Independently of this, every run writes training_curves.png and log_history.json next to the adapter."""

    report_to: Annotated[list[ReportTo], ListType("set")] | None = Field(
        None,
        max_length=len(REPORT_TO),
        description="Trackers, as transformers' report_to: tensorboard (event files uploaded with the adapter, "
        "under tensorboard/), mlflow (set tracking.mlflow too), or wandb, comet_ml ... with a trainer image that has their "
        "package (credentials through env).",
    )
    mlflow: Mlflow | None = Field(None, description="MLflow server (reportTo mlflow).")


class RunPolicy(ApiModel):
    """Restarts, deadlines, cleanup, pausing and queueing."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="New attempts after a failure (each resumes from the latest checkpoint). Failures in "
        "configuration or data are not retried.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=31536000,
        description="Fail the job when it has been running longer than this (all attempts).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31536000,
        description="Delete the FineTuneJob (and its children) this long after it finished.",
    )
    suspend: bool = Field(
        False, description="Pause: the pods stop (after saving a checkpoint); set false to resume from it."
    )
    queue_name: (
        Annotated[
            str,
            pattern_rule(
                DNS1123_SUBDOMAIN,
                "runPolicy.queueName must be the name of a Kueue LocalQueue (a lowercase DNS subdomain)",
            ),
        ]
        | None
    ) = Field(
        None,
        max_length=63,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name); the job waits as Queued until Kueue "
        "admits it.",
    )


@rules(
    Rule(
        "self.method.type != 'qlora' || self.resources.gpusPerNode > 0",
        "method.type qlora needs GPUs (its 4-bit kernels are CUDA-only): set resources.gpusPerNode >= 1, or use "
        "method.type lora for CPU training",
        check=lambda s: s.method.type != "qlora" or s.resources.gpus_per_node > 0,
        field_path=".resources.gpusPerNode",
    ),
    Rule(
        "self.hyperparameters.precision != 'fp16' || self.resources.gpusPerNode > 0",
        "hyperparameters.precision fp16 needs GPUs: use auto, bf16 or fp32 for CPU training, or set "
        "resources.gpusPerNode >= 1",
        check=lambda s: s.hyperparameters.precision != "fp16" or s.resources.gpus_per_node > 0,
        field_path=".hyperparameters.precision",
    ),
    *TRAINING_RULES,
)
class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on which data, how, on which hardware, and where the results go."""

    base_model: Annotated[
        FineTuneBaseModel,
        immutable("spec.baseModel is immutable: create a new FineTuneJob to change the base model"),
    ] = Field(description="The base model to fine-tune (and the adapter to continue, if any).")

    @field_validator("base_model", mode="before")
    @classmethod
    def _plain_model_source(cls, v: Any) -> Any:
        # Python callers may pass the shared ModelSource (no initAdapter): take its fields.
        return v.model_dump(exclude_unset=True) if type(v) is ModelSource else v

    dataset: Annotated[
        Dataset, immutable("spec.dataset is immutable: create a new FineTuneJob to change the data")
    ] = Field(description="Training data and its preparation.")
    method: Annotated[
        Method, immutable("spec.method is immutable: create a new FineTuneJob to change the method")
    ] = Field(default_factory=Method, description="Fine-tuning method (default: LoRA, r 8).")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimization settings."
    )
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Metrics and early stopping.")
    resources: Resources = Field(default_factory=Resources, description="Nodes, GPUs and scheduling.")
    distributed: Distributed = Field(default_factory=Distributed, description="DeepSpeed ZeRO or DDP.")
    checkpointing: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoints and resume.")
    storage: Storage = Field(description="S3-compatible storage for checkpoints and the final adapter.")
    output: Output = Field(default_factory=Output, description="Extra outputs.")
    tracking: Tracking | None = Field(None, description="Experiment tracking: TensorBoard, MLflow ...")
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Restarts, deadlines, suspend, Kueue."
    )
    image: str | None = Field(None, max_length=1024, description="Trainer image; default: the operator's.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the trainer image; default: the operator's."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="Secrets for pulling the trainer image."
    )
    env: EnvList | None = Field(
        None, max_length=64, description="Extra environment variables for the trainer containers."
    )
    pod_metadata: PodMetadata | None = Field(None, description="Extra labels and annotations for the pods.")


# ---- status ------------------------------------------------------------------------------------


class Progress(ApiModel):
    """Training progress, patched by the trainer's rank 0 while it runs."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps of the whole run.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    percent: float | None = Field(
        None, ge=0, le=100, description="step / totalSteps, in percent (PROGRESS column)."
    )
    train_loss: float | None = Field(None, description="Latest training loss (LOSS column).")
    eval_loss: float | None = Field(None, description="Latest validation loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput, all processes.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to the end (ETA column).")
    updated_at: Timestamp | None = Field(None, description="Time of this report.")


class CheckpointStatus(ApiModel):
    """The checkpoints in storage."""

    latest: str | None = Field(None, max_length=URI_MAX, description="URI of the newest complete checkpoint.")
    step: int | None = Field(None, ge=0, description="Step of the newest complete checkpoint.")
    count: int | None = Field(None, ge=0, description="Complete checkpoints in storage.")


class AugmentationCounts(ApiModel):
    """What one augmentation method made."""

    generated: int = Field(0, ge=0, description="Variants made.")
    kept: int = Field(0, ge=0, description="Variants added to the training split.")
    dropped: int = Field(0, ge=0, description="Duplicates, unchanged, empty or too-long variants.")


class OutputStatus(ApiModel):
    """What the finished job produced."""

    adapter_uri: str | None = Field(
        None,
        max_length=URI_MAX,
        description="Where the final adapter is (PEFT format; the full model for method full).",
    )
    merged_uri: str | None = Field(
        None, max_length=URI_MAX, description="Where the merged model is, when output.mergedModel is set."
    )
    method: MethodType | None = Field(
        None,
        description="The method the saved output was trained with (read back from it by the trainer): lora, "
        "qlora and their merged models can be served by an AdapterDeployment; full is a whole model (serve "
        "adapterUri as an AdapterDeployment's baseModel.uri); prefix, prompt and ptuning are not served.",
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="LoRA rank r of the saved adapter (lora, qlora), as written in its adapter_config.json; an "
        "AdapterDeployment sizes vLLM's --max-lora-rank with it.",
    )
    trainable_parameters: int | None = Field(None, ge=0, description="Parameters trained.")
    total_parameters: int | None = Field(None, ge=0, description="Parameters of the model.")
    augmentation: dict[str, AugmentationCounts] | None = Field(
        None,
        max_length=8,
        description="Data augmentation per method (replace_synonyms, paraphrase, back_translate): variants "
        "generated, kept and dropped (duplicates, unchanged, empty or too long).",
    )


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator (phase, conditions, output) and the trainer (progress)."""

    phase: Phase | None = Field(
        None, description="Pending, Queued (waiting for Kueue), Running, Succeeded, Failed or Suspended."
    )
    conditions: Conditions | None = Field(None, max_length=32, description="Details of the current state.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )
    start_time: Timestamp | None = Field(None, description="When training started.")
    completion_time: Timestamp | None = Field(None, description="When the job finished.")
    attempt: int | None = Field(None, ge=1, description="Current attempt (1 + restarts so far).")
    workers: str | None = Field(
        None,
        max_length=32,
        description="Nodes x GPUs per node, e.g. 2x8 (WORKERS column; written by the operator).",
    )
    progress: Progress | None = Field(None, description="Training progress.")
    checkpoint: CheckpointStatus | None = Field(None, description="Checkpoints in storage.")
    output: OutputStatus | None = Field(None, description="Results.")
    init_adapter_uri: str | None = Field(
        None,
        max_length=URI_MAX,
        description="The adapter training continues (baseModel.initAdapter; a fineTuneJobRef resolved to that "
        "job's adapter), fixed when the first attempt starts.",
    )
    metrics: dict[str, float] | None = Field(
        None, max_length=128, description="Final evaluation metrics by name, e.g. perplexity, exact_match."
    )


class FineTuneJob(KindModel):
    """A fine-tuning run: multi-GPU, multi-node DeepSpeed training pods whose checkpoints and final adapter
    land in S3-compatible storage. Resumes from the latest checkpoint after a failure or preemption."""

    __name_rules__ = (
        Rule(
            "size(self) <= 63",
            "metadata.name of a FineTuneJob must be at most 63 characters (it is a label value on the pods); choose a shorter name",
            check=lambda name: len(name) <= 63,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        "kubetune.io/v1alpha1", description="kubetune.io/v1alpha1"
    )
    kind: Literal["FineTuneJob"] = Field("FineTuneJob", description="FineTuneJob")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(
        description="What to fine-tune, on which data, how, on which hardware, and where the results go."
    )
    status: FineTuneJobStatus | None = Field(None, description="Observed state (read-only for users).")
