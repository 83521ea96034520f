"""Types shared by both kinds: sources, storage, pod settings, scheduling and status bits.

Formats are checked with CEL rules rather than bare `pattern`s: the API server then answers
"storage.uri must look like s3://bucket or s3://bucket/prefix" instead of printing a regex.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kubetune_trainer.apimodel import (
    ApiModel,
    Format,
    IntOrString,
    ListType,
    PreserveUnknownFields,
    Rule,
    SchemaExtra,
    cel_matches,
    matches,
    rules,
)
from kubetune_trainer.settings import ModelDtype

# ---- formats (RE2 and Python `re` agree on this subset) ----------------------------------------------

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
MODEL_URI = r"^(s3|hf|pvc|file)://[^\s]+$"
# Data may also be a plain relative path: it resolves next to the manifest with `kubetune run --local`.
DATA_URI = r"^((s3|pvc|file)://[^\s]+|[^:\s]+)$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"
HTTP_URL = r"^https?://[^\s]+$"
QUANTITY = r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
URI_MAX = 2048


def pattern_rule(pattern: str, message: str) -> Rule:
    """A field rule: the string matches `pattern`; otherwise the API server prints `message`."""
    return Rule(cel_matches("self", pattern), message, check=lambda v: matches(v, pattern))


def model_uri_rule(field: str) -> Rule:
    return pattern_rule(
        MODEL_URI,
        f"{field} must be hf://org/name, s3://bucket/path, pvc://claim/path or file:///path (no spaces)",
    )


def data_uri_rule(field: str) -> Rule:
    return pattern_rule(
        DATA_URI,
        f"{field} must be s3://bucket/key, pvc://claim/path, file:///path or (with kubetune run --local) "
        "a relative path",
    )


QUANTITY_RULE = Rule(
    cel_matches("string(self)", QUANTITY),
    "must be a Kubernetes quantity such as 4, 500m or 64Gi",
    check=lambda v: matches(str(v), QUANTITY),
)


def dns_label_rule(field: str) -> Rule:
    return pattern_rule(
        DNS1123_LABEL,
        f"{field} must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
        "with a letter or digit",
    )


# A resource quantity (int-or-string): 8, 500m, 64Gi.
Quantity = Annotated[int | str, IntOrString(), QUANTITY_RULE, SchemaExtra({"maxLength": 64})]
FreeForm = Annotated[dict[str, Any], PreserveUnknownFields()]
Timestamp = Annotated[str, Format("date-time"), Field(max_length=64)]


# ---- the base model ----------------------------------------------------------------------------------


class ModelSource(ApiModel):
    """The base model: where its weights and tokenizer come from and how to load them."""

    uri: Annotated[str, model_uri_rule("baseModel.uri")] = Field(
        max_length=URI_MAX,
        description="Base model location: hf://org/name (a model hub id), s3://bucket/path (a directory "
        "written by save_pretrained), pvc://claim/path (a PersistentVolumeClaim in the same namespace, "
        "mounted read-only) or file:///path inside the image.",
    )
    revision: str | None = Field(
        None,
        max_length=256,
        description="Model hub revision (branch, tag or commit) for hf:// models; ignored for other schemes.",
    )
    dtype: ModelDtype = Field(
        "auto",
        description="Data type the weights are loaded in. auto: the dtype the checkpoint was saved in.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the checkpoint. Keep false unless you trust the source.",
    )


# ---- storage -----------------------------------------------------------------------------------------


class SecretRef(ApiModel):
    """A Secret in the same namespace holding S3 credentials (the keys are configurable)."""

    name: Annotated[
        str,
        pattern_rule(
            DNS1123_SUBDOMAIN, "secretRef.name must be the name of a Secret (a lowercase DNS subdomain)"
        ),
    ] = Field(max_length=253, description="Name of the Secret (same namespace).")
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

    endpoint: (
        Annotated[
            str,
            pattern_rule(
                HTTP_URL, "storage.endpoint must be an http:// or https:// URL, e.g. http://minio:9000"
            ),
        ]
        | None
    ) = Field(
        None,
        max_length=URI_MAX,
        description="S3 endpoint URL, e.g. http://minio.minio.svc:9000. Empty: the operator's default "
        "(Helm value storage.endpoint), else AWS S3.",
    )
    region: str | None = Field(None, max_length=64, description="Region. Empty: the operator's default.")
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the credentials. Empty: the operator's default Secret (Helm value "
        "storage.secretName).",
    )


# ---- pods ----------------------------------------------------------------------------------------------


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(max_length=253, description="Name of the object in the same namespace.")


class PodMetadata(ApiModel):
    """Extra labels and annotations for the pods (cost centres, service-mesh opt-outs ...)."""

    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=64, description="Labels added to every pod."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        None, max_length=64, description="Annotations added to every pod."
    )


@rules(
    Rule(
        "!(has(self.value) && has(self.valueFrom))",
        "an env entry takes value or valueFrom, not both; remove one of them",
        check=lambda e: e.value is None or e.value_from is None,
    ),
    Rule(
        "!self.name.startsWith('KUBETUNE_')",
        "env names starting with KUBETUNE_ are reserved for kubetune; rename the variable",
        check=lambda e: not e.name.startswith("KUBETUNE_"),
        field_path=".name",
    ),
)
class EnvVar(ApiModel):
    """A container environment variable, as in a Pod spec."""

    name: Annotated[
        str,
        pattern_rule(
            ENV_NAME, "env name must consist of letters, digits, '_', '-' or '.', not starting with a digit"
        ),
    ] = Field(max_length=253, description="Variable name.")
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: FreeForm | None = Field(
        None,
        description="Where the value comes from, exactly as env[].valueFrom in a Pod spec (secretKeyRef, "
        "configMapKeyRef, fieldRef, resourceFieldRef); passed through unchanged.",
    )


EnvList = Annotated[list[EnvVar], ListType("map", ("name",))]


@rules(
    Rule(
        "self.operator != 'Exists' || !has(self.value)",
        "a toleration with operator Exists matches every value: remove value or use operator Equal",
        check=lambda t: t.operator != "Exists" or t.value is None,
        field_path=".value",
    ),
)
class Toleration(ApiModel):
    """A Pod toleration (same fields as in a Pod spec), e.g. for tainted GPU nodes."""

    key: str | None = Field(
        None, max_length=316, description="Taint key; empty with operator Exists matches all keys."
    )
    operator: Literal["Exists", "Equal"] = Field(
        "Equal", description="Equal: the taint's value must equal value; Exists: any value."
    )
    value: str | None = Field(None, max_length=63, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="NoExecute only: how long the pod stays bound after the taint appears."
    )


# ---- status --------------------------------------------------------------------------------------------


class Condition(ApiModel):
    """A standard Kubernetes condition (the fields of metav1.Condition)."""

    type: str = Field(
        max_length=316, description="Condition type in CamelCase, e.g. Running, Succeeded, Failed."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", max_length=1024, description="One-word CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details, with what to do next.")
    last_transition_time: Timestamp | None = Field(None, description="When the status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the condition was computed from."
    )


Conditions = Annotated[list[Condition], ListType("map", ("type",))]
