"""kubetune.io/v1alpha1: typed models of FineTuneJob and AdapterDeployment (the API's source of truth)."""

from __future__ import annotations

from typing import Any

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"

__all__ = [
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "load_adapterdeployment",
    "load_finetunejob",
]


def load_finetunejob(obj: dict[str, Any]) -> FineTuneJob:
    """Validate a FineTuneJob manifest client-side (same defaults as the API server)."""
    return FineTuneJob.model_validate(obj)


def load_adapterdeployment(obj: dict[str, Any]) -> AdapterDeployment:
    return AdapterDeployment.model_validate(obj)
