"""AdapterDeployment (kubetune.io/v1alpha1): a base model and several adapters behind an OpenAI API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .common import (
    DNS1123_LABEL,
    MODEL_URI,
    QUANTITY,
    ApiModel,
    Condition,
    EnvVar,
    LocalObjectReference,
    ModelSource,
    S3Connection,
    cel,
    rules,
)


class ServedModel(ModelSource):
    served_name: str | None = Field(
        None,
        max_length=253,
        description="Name clients use for the base model (`model` field). Default: the resource's name.",
    )


class FineTuneJobRef(ApiModel):
    name: str = Field(
        ...,
        max_length=253,
        description="A FineTuneJob in the same namespace; its adapter is served once it Succeeded.",
    )


class Adapter(ApiModel):
    """One adapter, served under `name` (the OpenAI `model` field)."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "has(self.source) != has(self.fineTuneJobRef)",
                "each adapter needs exactly one of source (an s3:// URI) or fineTuneJobRef (a FineTuneJob)",
            )
        )
    }

    name: str = Field(
        ...,
        pattern=DNS1123_LABEL,
        max_length=63,
        description="Adapter name (a DNS-1123 label, unique in the list).",
    )
    source: str | None = Field(
        None,
        pattern=MODEL_URI,
        max_length=2048,
        description="Adapter directory: s3://bucket/path/ or pvc://claim/path.",
    )
    fine_tune_job_ref: FineTuneJobRef | None = Field(
        None, description="Serve the adapter a FineTuneJob produced."
    )
    rank: int | None = Field(
        None, ge=1, le=1024, description="LoRA rank if known (vLLM sizes its LoRA slots with it)."
    )


class Autoscaling(ApiModel):
    model_config = {
        "json_schema_extra": rules(
            cel(
                "self.maxReplicas >= self.minReplicas",
                "autoscaling.maxReplicas must be >= autoscaling.minReplicas",
            )
        )
    }

    min_replicas: int = Field(1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(..., ge=1, le=1000, description="Most replicas.")
    target_cpu_utilization_percentage: int = Field(
        80,
        ge=1,
        le=100,
        alias="targetCPUUtilizationPercentage",
        description="Average CPU utilisation to aim for.",
    )


class ServerResources(ApiModel):
    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=253, description="Extended resource name of the GPUs."
    )
    cpu: str | None = Field(None, pattern=QUANTITY, description="CPU request per replica.")
    memory: str | None = Field(None, pattern=QUANTITY, description="Memory request and limit per replica.")


class ServiceSpec(ApiModel):
    port: int = Field(8000, ge=1, le=65535, description="Service port of the OpenAI API.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")


class VllmSpec(ApiModel):
    image: str | None = Field(None, max_length=1024, description="vLLM image (default: the operator's).")
    max_loras: int | None = Field(
        None, ge=1, le=256, description="--max-loras (default: number of adapters)."
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="--max-lora-rank (default: the largest known adapter rank, rounded up).",
    )
    extra_args: list[str] = Field(default_factory=list, max_length=64, description="More vLLM arguments.")


class AdapterDeploymentSpec(ApiModel):
    """What to serve, with which runtime, how many replicas and where."""

    model_config = {
        "json_schema_extra": rules(
            cel(
                "!(has(self.replicas) && has(self.autoscaling))",
                "set replicas or autoscaling, not both (with autoscaling the HPA sets the replicas)",
            ),
        )
    }

    base_model: ServedModel = Field(..., description="The base model the adapters were trained on.")
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Adapters to serve; names must be unique.",
    )
    runtime: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="builtin: kubetune's server (mixed-adapter batches); vllm: vLLM's OpenAI server.",
    )
    hot_reload: bool = Field(
        False,
        description="Load and unload adapters in running pods instead of rolling them when the list changes.",
    )
    replicas: int | None = Field(
        None, ge=0, le=1000, description="Replicas (default 1) when not autoscaling."
    )
    autoscaling: Autoscaling | None = Field(None, description="HorizontalPodAutoscaler on CPU utilisation.")
    resources: ServerResources = Field(default_factory=ServerResources, description="Per-replica resources.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity.")
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(None, max_length=253, description="Scheduler for the pods.")
    service: ServiceSpec = Field(
        default_factory=ServiceSpec, description="The Service in front of the replicas."
    )
    storage: S3Connection = Field(
        default_factory=S3Connection, description="S3 access for s3:// models and adapters."
    )
    image: str | None = Field(
        None, max_length=1024, description="Server image for the builtin runtime (and fetchers)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Image pull Secrets."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables for the server.")
    vllm: VllmSpec | None = Field(None, description="vLLM runtime settings.")


class AdapterStatus(ApiModel):
    name: str = Field(..., description="Adapter name.")
    uri: str | None = Field(
        None, description="Where it is loaded from (resolved from a FineTuneJob if referenced)."
    )
    ready: bool = Field(False, description="Served by the current replicas.")
    message: str = Field("", description="Why it is not ready yet, or 'served'.")


class AdapterDeploymentStatus(ApiModel):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] | None = Field(
        None,
        description="Pending, Progressing (rolling out or waiting for a FineTuneJob), Ready or Degraded.",
    )
    ready_replicas: int | None = Field(None, ge=0, description="Replicas ready to serve.")
    replicas: int | None = Field(None, ge=0, description="Replicas wanted.")
    ready_adapters: str | None = Field(None, description="Adapters served / adapters listed, e.g. 2/3.")
    adapters: list[AdapterStatus] = Field(default_factory=list, description="Per-adapter state.")
    endpoint: str | None = Field(None, description="OpenAI base URL inside the cluster.")
    conditions: list[Condition] = Field(default_factory=list, description="Details of the current state.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )


class AdapterDeployment(ApiModel):
    """Serves a base model with several adapters behind an OpenAI-compatible API."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field("kubetune.io/v1alpha1", alias="apiVersion")
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None
