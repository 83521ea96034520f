"""kubetune.io/v1alpha1: typed models of FineTuneJob, FineTuneSweep and AdapterDeployment (the API's source of truth).

    from kubetune_operator.api import load_finetunejob
    job = load_finetunejob(yaml.safe_load(text))   # InvalidManifestError names the field and the fix
    job.spec.method.type, job.to_manifest()

Imports only pydantic: the CLI and the operator image can both use it.
"""

from __future__ import annotations

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .finetunesweep import FineTuneSweep, FineTuneSweepSpec, FineTuneSweepStatus
from .manifest import InvalidManifestError, load_adapterdeployment, load_finetunejob, load_finetunesweep

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "FineTuneSweepStatus",
    "InvalidManifestError",
    "load_adapterdeployment",
    "load_finetunejob",
    "load_finetunesweep",
]
