"""Names, labels and owner references shared by every child object (pure functions)."""

from __future__ import annotations

import hashlib
from typing import Any

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

MANAGED_BY = "kubetune-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# Which parent a child belongs to (the operator's watches select on these).
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_ADAPTERDEPLOYMENT = "kubetune.io/adapterdeployment"
LABEL_FINETUNESWEEP = "kubetune.io/finetunesweep"
LABEL_ATTEMPT = "kubetune.io/attempt"


def child_labels(kind_label: str, parent_name: str, component: str) -> dict[str, str]:
    """The labels every child carries. The parent's own labels are not copied: Argo CD's
    tracking label would make children look like resources of the Application."""
    return {
        LABEL_NAME: "kubetune",
        LABEL_INSTANCE: parent_name,
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "kubetune",
        LABEL_MANAGED_BY: MANAGED_BY,
        kind_label: parent_name,
    }


def owner_reference(parent: dict[str, Any]) -> dict[str, Any]:
    meta = parent["metadata"]
    return {
        "apiVersion": parent.get("apiVersion", API_VERSION),
        "kind": parent["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def dns_name(*parts: str, max_len: int = 63) -> str:
    """A DNS-1123 label from parts; long names are shortened with a stable hash suffix."""
    name = "-".join(p.strip("-") for p in parts if p).lower()
    if len(name) <= max_len:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_len - 9].rstrip('-')}-{digest}"
