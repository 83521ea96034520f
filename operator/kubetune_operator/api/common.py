"""Building blocks shared by both kinds: the base model, CEL rules, sources, storage, status bits.

The models are the single source of truth of the API: `make generate` renders the CRDs (with
every description, default, enum, bound and CEL rule) and docs/api.md from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
MODEL_URI = r"^(s3|hf|pvc|file)://[^\s]+$"
DATA_URI = r"^((s3|pvc|file)://[^\s]+|[^:\s]+)$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry. Messages say what is wrong and how to fix it."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """For `json_schema_extra`: attach CEL rules to a model or a field."""
    return {"x-kubernetes-validations": list(entries)}


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


class Quantity(str):
    """A Kubernetes resource quantity such as `500m`, `4`, `16Gi` (int-or-string)."""


class ModelSource(ApiModel):
    """Where the base model comes from."""

    uri: str = Field(
        ...,
        pattern=MODEL_URI,
        max_length=2048,
        description="Base model location: s3://bucket/path, hf://org/name (a model hub id), "
        "pvc://claim/path (a PersistentVolumeClaim in the job's namespace) or file:///path inside the image.",
    )
    revision: str | None = Field(
        None, max_length=256, description="Model hub revision (branch, tag or commit) for hf:// models."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Data type the weights are loaded in. auto: what the checkpoint says."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped with the checkpoint. Keep false unless you trust the source.",
    )


class SecretRef(ApiModel):
    """A Secret in the same namespace holding S3 credentials."""

    name: str = Field(
        ..., pattern=DNS1123_SUBDOMAIN, max_length=253, description="Name of the Secret (same namespace)."
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", max_length=253, description="Key in the Secret that holds the access key id."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        max_length=253,
        description="Key in the Secret that holds the secret access key.",
    )


class S3Connection(ApiModel):
    """How to reach S3-compatible storage. Credentials only ever come from a Secret."""

    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="S3 endpoint URL, e.g. http://minio.minio.svc:9000. Empty: the operator's default "
        "(Helm value storage.endpoint), else AWS S3.",
    )
    region: str | None = Field(None, max_length=64, description="Region. Empty: the operator's default.")
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the credentials. Empty: the operator's default Secret (Helm value storage.secretName).",
    )


class LocalObjectReference(ApiModel):
    name: str = Field(..., max_length=253, description="Name of the object in the same namespace.")


class PodMetadata(ApiModel):
    """Extra labels and annotations for the pods (cost centres, service-mesh opt-outs ...)."""

    labels: dict[str, str] = Field(default_factory=dict, description="Labels added to every pod.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations added to every pod.")


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(..., max_length=316, description="Condition type, e.g. Running, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field("", max_length=1024, description="One-word CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details, with what to do next.")
    last_transition_time: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the condition was computed from."
    )


EnvVar = dict[str, Any]
"""A container environment variable (name plus value or valueFrom), as in a Pod spec."""
