"""What every pod the operator renders shares: its user, the paths its processes write, hardening.

Trainer pods (FineTuneJob) and server pods (AdapterDeployment, both runtimes) run as the trainer
image's user, 65532, with a read-only root filesystem. Every path a process writes is therefore
a mounted volume: HOME (with every cache under it) and /tmp are emptyDirs, /workspace is the
working directory. The paths are set in each container's env so the pods do not depend on the
image's ENV (the vLLM image has no such ENV, nor a passwd entry for 65532).

Each path is defined here once; trainer-image/Dockerfile's ENV and directories match them.
"""

from __future__ import annotations

from typing import Any

Body = dict[str, Any]

# The trainer image's user and group (trainer-image/Dockerfile: USER 65532:65532).
POD_UID = 65532
POD_GID = 65532
POD_USER = "kubetune"

HOME = "/home/kubetune"
CACHE_DIR = f"{HOME}/.cache"
HF_HOME = f"{CACHE_DIR}/huggingface"
KUBETUNE_CACHE = f"{CACHE_DIR}/kubetune"  # base models downloaded from s3:// by the trainer
TORCH_EXTENSIONS_DIR = f"{CACHE_DIR}/torch_extensions"  # DeepSpeed's just-in-time ops
TRITON_CACHE_DIR = f"{CACHE_DIR}/triton"
TORCHINDUCTOR_CACHE_DIR = f"{CACHE_DIR}/torchinductor"
MPLCONFIGDIR = f"{CACHE_DIR}/matplotlib"
VLLM_CACHE_ROOT = f"{CACHE_DIR}/vllm"
TMP_DIR = "/tmp"
WORKSPACE = "/workspace"

HOME_VOLUME = "home"
TMP_VOLUME = "tmp"
WORKSPACE_VOLUME = "workspace"


def runtime_env() -> list[Body]:
    """HOME, the user name and every cache directory, for every container the operator renders."""
    return [
        {"name": "HOME", "value": HOME},
        # getpass.getuser() (torch's default inductor cache dir ...) reads USER before the passwd
        # file, which has no entry for 65532 in images other than the trainer's.
        {"name": "USER", "value": POD_USER},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "KUBETUNE_CACHE", "value": KUBETUNE_CACHE},
        {"name": "TORCH_EXTENSIONS_DIR", "value": TORCH_EXTENSIONS_DIR},
        {"name": "TRITON_CACHE_DIR", "value": TRITON_CACHE_DIR},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": TORCHINDUCTOR_CACHE_DIR},
        {"name": "MPLCONFIGDIR", "value": MPLCONFIGDIR},
    ]


def writable_mounts() -> list[Body]:
    """The writable volumes every container mounts (HOME with the caches, /tmp, /workspace)."""
    return [
        {"name": HOME_VOLUME, "mountPath": HOME},
        {"name": TMP_VOLUME, "mountPath": TMP_DIR},
        {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE},
    ]


def writable_volumes() -> list[Body]:
    return [{"name": name, "emptyDir": {}} for name in (HOME_VOLUME, TMP_VOLUME, WORKSPACE_VOLUME)]


def pod_security_context() -> Body:
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_GID,
        # emptyDirs (and any volume that supports it) are group-owned by 65532.
        "fsGroup": POD_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Body:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
