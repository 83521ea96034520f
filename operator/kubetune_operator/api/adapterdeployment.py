"""AdapterDeployment (kubetune.io/v1alpha1): a base model and several adapters behind an OpenAI API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kubetune_trainer.apimodel import ApiModel, KindModel, ListType, Rule, rules

from .common import (
    DNS1123_SUBDOMAIN,
    MODEL_URI,
    RESOURCE_NAME,
    URI_MAX,
    Conditions,
    EnvList,
    FreeForm,
    LocalObjectReference,
    ModelSource,
    Quantity,
    S3Connection,
    Toleration,
    dns_label_rule,
    pattern_rule,
)

Phase = Literal["Pending", "Progressing", "Ready", "Degraded"]


class ServedModel(ModelSource):
    """The base model the adapters were trained on, and the name clients use for it."""

    served_name: str | None = Field(
        None,
        max_length=253,
        description="Name clients use for the base model (the OpenAI `model` field). Default: the "
        "AdapterDeployment's name.",
    )


class FineTuneJobRef(ApiModel):
    """A FineTuneJob whose adapter is served once it has Succeeded."""

    name: str = Field(max_length=253, description="Name of a FineTuneJob in the same namespace.")


class FineTuneSweepRef(ApiModel):
    """A FineTuneSweep whose best trial's adapter is served once the sweep has Succeeded."""

    name: str = Field(max_length=253, description="Name of a FineTuneSweep in the same namespace.")


@rules(
    Rule(
        "[has(self.source), has(self.fineTuneJobRef), has(self.fineTuneSweepRef)].filter(x, x).size() == 1",
        "each adapter needs exactly one of source (an s3://, hf://, pvc:// or file:// URI), fineTuneJobRef "
        "(a FineTuneJob in this namespace) or fineTuneSweepRef (a FineTuneSweep in this namespace)",
        check=lambda a: (
            [a.source is not None, a.fine_tune_job_ref is not None, a.fine_tune_sweep_ref is not None].count(
                True
            )
            == 1
        ),
    ),
)
class Adapter(ApiModel):
    """One adapter, served under `name` (the OpenAI `model` field)."""

    name: Annotated[str, dns_label_rule("adapter name")] = Field(
        max_length=63,
        description="Adapter name: a DNS-1123 label, unique in the list; clients pass it as `model`.",
    )
    source: (
        Annotated[
            str,
            pattern_rule(
                MODEL_URI,
                "adapter source must be s3://bucket/path, hf://org/name, pvc://claim/path or file:///path",
            ),
        ]
        | None
    ) = Field(
        None,
        max_length=URI_MAX,
        description="Adapter directory (adapter_config.json + weights): s3://bucket/path/, pvc://claim/path, "
        "hf://org/name or file:///path.",
    )
    fine_tune_job_ref: FineTuneJobRef | None = Field(
        None, description="Serve the adapter a FineTuneJob produced (status.output.adapterUri)."
    )
    fine_tune_sweep_ref: FineTuneSweepRef | None = Field(
        None,
        description="Serve the adapter of a FineTuneSweep's best trial (status.bestTrial.adapterUri) once the "
        "sweep has Succeeded.",
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="LoRA rank if known (vLLM sizes its LoRA slots with it). Unset for a fineTuneJobRef or "
        "fineTuneSweepRef: the rank the job saved (its status.output.rank).",
    )


@rules(
    Rule(
        "self.maxReplicas >= self.minReplicas",
        "autoscaling.maxReplicas must be >= autoscaling.minReplicas",
        check=lambda a: a.max_replicas >= a.min_replicas,
        field_path=".maxReplicas",
    ),
)
class Autoscaling(ApiModel):
    """A HorizontalPodAutoscaler on CPU utilization."""

    min_replicas: int = Field(1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_cpu_utilization_percentage: int = Field(
        80,
        ge=1,
        le=100,
        alias="targetCPUUtilizationPercentage",
        description="Average CPU utilization (percent of the request) to aim for.",
    )


class ServerResources(ApiModel):
    """Resources of each replica."""

    gpus: int = Field(
        0, ge=0, le=16, description="GPUs per replica, 0-16 (the builtin runtime also runs on CPU)."
    )
    gpu_resource_name: Annotated[
        str,
        pattern_rule(
            RESOURCE_NAME,
            "resources.gpuResourceName must be an extended resource name such as nvidia.com/gpu",
        ),
    ] = Field("nvidia.com/gpu", max_length=253, description="Extended resource name of the GPUs.")
    cpu: Quantity | None = Field(None, description="CPU request per replica, e.g. 4.")
    memory: Quantity | None = Field(None, description="Memory request and limit per replica, e.g. 32Gi.")


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    port: int = Field(8000, ge=1, le=65535, description="Service port of the OpenAI API.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")


class VllmSpec(ApiModel):
    """vLLM runtime settings (vLLM's OpenAI server with --enable-lora)."""

    image: str | None = Field(None, max_length=1024, description="vLLM image; default: the operator's.")
    max_loras: int | None = Field(
        None, ge=1, le=256, description="--max-loras, adapters in one batch; default: the number of adapters."
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="--max-lora-rank; default: the largest known adapter rank, rounded up.",
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None, max_length=64, description="More vLLM arguments, e.g. [--max-model-len, '4096']."
    )


class SecretKeyRef(ApiModel):
    """One key of a Secret in the same namespace."""

    name: Annotated[
        str,
        pattern_rule(DNS1123_SUBDOMAIN, "the Secret name must be a lowercase DNS subdomain, e.g. serve-keys"),
    ] = Field(max_length=253, description="Name of the Secret (same namespace).")
    key: str = Field(max_length=253, description="Key in the Secret.")


class ApiKeySecretRef(SecretKeyRef):
    """The Secret key holding the clients' API keys, one per line (runtime vllm: exactly one key)."""

    key: str = Field("api-keys", max_length=253, description="Key in the Secret; default api-keys.")


class AdminKeySecretRef(SecretKeyRef):
    """The Secret key holding the admin key(s) for loading and unloading adapters."""

    key: str = Field("admin-key", max_length=253, description="Key in the Secret; default admin-key.")


class ServerAuth(ApiModel):
    """API keys the server requires (OpenAI `Authorization: Bearer KEY`) on every /v1 route."""

    api_key_secret_ref: ApiKeySecretRef = Field(
        description="Secret key with the API keys clients send, one per line (rotations apply without a "
        "restart on the builtin runtime). /health, /ready and /metrics stay open for probes and Prometheus."
    )
    admin_key_secret_ref: AdminKeySecretRef | None = Field(
        None,
        description="Builtin runtime: Secret key with the admin key(s), the only keys allowed to load and "
        "unload adapters (the hot-reload sidecar sends the first). Without it, with hotReload any API key may.",
    )


class LabelSelectorRequirement(ApiModel):
    """One label requirement, as in a Kubernetes label selector."""

    key: str = Field(max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to values."
    )
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=64, description="Values for In / NotIn; empty for Exists / DoesNotExist."
    )


class LabelSelector(ApiModel):
    """A Kubernetes label selector; an empty one selects everything."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="Labels that must all match."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=32, description="Requirements that must all hold."
    )


@rules(
    Rule(
        "has(self.namespaceSelector) || has(self.podSelector)",
        "each networkPolicy.allowFrom entry needs a namespaceSelector, a podSelector or both",
        check=lambda p: p.namespace_selector is not None or p.pod_selector is not None,
    ),
)
class NetworkPolicyPeer(ApiModel):
    """Clients allowed to reach the server: pods matching podSelector in namespaces matching
    namespaceSelector (only podSelector: this namespace; only namespaceSelector: all pods there)."""

    namespace_selector: LabelSelector | None = Field(
        None, description="A label selector for namespaces, as in a NetworkPolicy peer."
    )
    pod_selector: LabelSelector | None = Field(
        None, description="A label selector for pods, as in a NetworkPolicy peer."
    )


class ServerNetworkPolicy(ApiModel):
    """A NetworkPolicy that admits only the listed clients to the server pods' API port."""

    allow_from: list[NetworkPolicyPeer] | None = Field(
        None,
        max_length=32,
        description="Who may connect. Empty or unset: pods in this namespace only. Add the namespace of "
        "your Prometheus to scrape /metrics.",
    )


@rules(
    Rule(
        "!(has(self.replicas) && has(self.autoscaling))",
        "set replicas or autoscaling, not both (with autoscaling the HPA sets the replicas)",
        check=lambda s: s.replicas is None or s.autoscaling is None,
        field_path=".replicas",
        reason="FieldValueForbidden",
    ),
    Rule(
        "!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
        "adapter names must be unique: rename or remove the duplicate in spec.adapters",
        check=lambda s: len({a.name for a in s.adapters or []}) == len(s.adapters or []),
        field_path=".adapters",
    ),
    Rule(
        "self.runtime != 'vllm' || self.resources.gpus >= 1",
        "runtime vllm needs a GPU: set resources.gpus >= 1, or use runtime builtin (runs on CPU too)",
        check=lambda s: s.runtime != "vllm" or s.resources.gpus >= 1,
        field_path=".resources.gpus",
    ),
    Rule(
        "!has(self.auth) || !has(self.auth.adminKeySecretRef) || self.runtime == 'builtin'",
        "auth.adminKeySecretRef applies to runtime builtin only: vLLM has one key set (its --api-key), "
        "which also guards adapter loading; remove adminKeySecretRef",
        check=lambda s: s.auth is None or s.auth.admin_key_secret_ref is None or s.runtime == "builtin",
        field_path=".auth.adminKeySecretRef",
        reason="FieldValueForbidden",
    ),
    Rule(
        "!has(self.vllm) || self.runtime == 'vllm'",
        "spec.vllm only applies to runtime vllm: remove it or set runtime: vllm",
        check=lambda s: s.vllm is None or s.runtime == "vllm",
        field_path=".vllm",
        reason="FieldValueForbidden",
    ),
)
class AdapterDeploymentSpec(ApiModel):
    """What to serve, with which runtime, how many replicas and where."""

    base_model: ServedModel = Field(description="The base model the adapters were trained on.")
    adapters: Annotated[list[Adapter], ListType("map", ("name",))] | None = Field(
        None, max_length=32, description="Adapters to serve; each name is unique."
    )
    runtime: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="builtin: kubetune's server (mixed-adapter batches, CPU or GPU); vllm: vLLM's OpenAI server "
        "(GPU).",
    )
    hot_reload: bool = Field(
        False,
        description="When the adapter list changes, load and unload adapters in the running pods instead of "
        "rolling them.",
    )
    replicas: int | None = Field(None, ge=0, le=1000, description="Replicas when not autoscaling; default 1.")
    autoscaling: Autoscaling | None = Field(
        None, description="Scale on CPU utilization instead of fixed replicas."
    )
    resources: ServerResources = Field(default_factory=ServerResources, description="Per-replica resources.")
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
        None, max_length=253, description="Scheduler for the pods; default: the cluster's."
    )
    service: ServiceSpec = Field(
        default_factory=ServiceSpec, description="The Service in front of the replicas."
    )
    storage: S3Connection = Field(
        default_factory=S3Connection, description="S3 access for s3:// models and adapters."
    )
    image: str | None = Field(
        None,
        max_length=1024,
        description="Server image for the builtin runtime (and the fetchers); default: the operator's.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy; default: the operator's."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="Image pull Secrets."
    )
    env: EnvList | None = Field(
        None, max_length=64, description="Extra environment variables for the server."
    )
    vllm: VllmSpec | None = Field(None, description="vLLM settings (runtime vllm only).")
    auth: ServerAuth | None = Field(
        None,
        description="Require API keys from a Secret. Unset: the OpenAI routes are open to anyone who "
        "reaches the Service (use networkPolicy, or set this).",
    )
    network_policy: ServerNetworkPolicy | None = Field(
        None, description="Create a NetworkPolicy that admits only these clients to the server pods."
    )


class AdapterStatus(ApiModel):
    """The state of one adapter."""

    name: str = Field(max_length=63, description="Adapter name.")
    uri: str | None = Field(
        None,
        max_length=URI_MAX,
        description="Where it is loaded from (resolved from the FineTuneJob or FineTuneSweep if referenced).",
    )
    ready: bool = Field(False, description="Served by the current replicas.")
    message: str = Field("", max_length=4096, description="Why it is not ready yet, or 'served'.")


class AdapterDeploymentStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(
        None,
        description=(
            "Pending, Progressing (rolling out or waiting for a FineTuneJob or FineTuneSweep), Ready or Degraded "
            "(a referenced FineTuneJob or FineTuneSweep failed, or the server is failing: see the Available "
            "condition)."
        ),
    )
    ready_replicas: int | None = Field(None, ge=0, description="Replicas ready to serve (READY column).")
    replicas: int | None = Field(None, ge=0, description="Replicas wanted.")
    ready_adapters: str | None = Field(
        None, max_length=32, description="Adapters served / adapters listed, e.g. 2/3 (ADAPTERS column)."
    )
    adapters: Annotated[list[AdapterStatus], ListType("map", ("name",))] | None = Field(
        None, max_length=32, description="Per-adapter state."
    )
    endpoint: str | None = Field(
        None, max_length=URI_MAX, description="OpenAI base URL inside the cluster (ENDPOINT column)."
    )
    conditions: Conditions | None = Field(None, max_length=32, description="Details of the current state.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )


class AdapterDeployment(KindModel):
    """Serves a base model with several adapters (from S3 or from FineTuneJobs) behind an OpenAI-compatible
    API, with kubetune's built-in server or vLLM."""

    __name_rules__ = (
        Rule(
            "size(self) <= 63",
            "metadata.name of an AdapterDeployment must be at most 63 characters (it names the Service and is a label value); choose a shorter name",
            check=lambda name: len(name) <= 63,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        "kubetune.io/v1alpha1", description="kubetune.io/v1alpha1"
    )
    kind: Literal["AdapterDeployment"] = Field("AdapterDeployment", description="AdapterDeployment")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: AdapterDeploymentSpec = Field(
        description="What to serve, with which runtime, how many replicas and where."
    )
    status: AdapterDeploymentStatus | None = Field(None, description="Observed state (read-only for users).")
