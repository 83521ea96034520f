"""FineTuneJob spec -> child manifests. Pure functions: no I/O, unit-tested without a cluster.

They read the spec as the API server stores it (camelCase, CRD defaults applied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from .. import meta, podspec
from ..api.common import SecretRef
from ..api.finetunejob import Resources
from ..convert import PVC_MOUNT_ROOT, pvc_claims, typed
from ..settings import Settings
from .observe import NON_RETRYABLE_EXIT_CODES, TRAINER_CONTAINER

Body = dict[str, Any]

CONFIG_MOUNT = "/etc/kubetune"
CONFIG_FILE = "config.yaml"
# kubetune_trainer.launch gives the workers this many seconds (less a margin) after SIGTERM
# before torchrun kills them: the pod's terminationGracePeriodSeconds.
GRACE_ENV = "KUBETUNE_TERMINATION_GRACE_SECONDS"


@dataclass(frozen=True)
class Names:
    service_account: str
    role: str
    role_binding: str
    config_map: str
    service: str
    job_prefix: str

    def job(self, attempt: int) -> str:
        return f"{self.job_prefix}-{attempt}"


def names(ftj: Body) -> Names:
    name = ftj["metadata"]["name"]
    # Pod hostnames are <job>-<index>: keep the Job name short enough for 63-char labels.
    return Names(
        service_account=meta.dns_name(name, "trainer"),
        role=meta.dns_name(name, "trainer"),
        role_binding=meta.dns_name(name, "trainer"),
        config_map=meta.dns_name(name, "config", max_len=253),
        service=meta.dns_name(name, "workers"),
        job_prefix=meta.dns_name(name, max_len=52),
    )


def _base(ftj: Body, api_version: str, kind: str, name: str, component: str, extra_labels=None) -> Body:
    labels = meta.child_labels(meta.LABEL_FINETUNEJOB, ftj["metadata"]["name"], component)
    labels.update(extra_labels or {})
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": ftj["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [meta.owner_reference(ftj)],
        },
    }


def service_account(ftj: Body) -> Body:
    sa = _base(ftj, "v1", "ServiceAccount", names(ftj).service_account, "trainer")
    sa["automountServiceAccountToken"] = False  # the pod mounts a projected token itself
    return sa


def role(ftj: Body) -> Body:
    """Rank 0 may patch the status of its own FineTuneJob, and nothing else."""
    r = _base(ftj, "rbac.authorization.k8s.io/v1", "Role", names(ftj).role, "trainer")
    r["rules"] = [
        {
            "apiGroups": [meta.GROUP],
            "resources": ["finetunejobs/status"],
            "resourceNames": [ftj["metadata"]["name"]],
            "verbs": ["patch"],
        }
    ]
    return r


def role_binding(ftj: Body) -> Body:
    n = names(ftj)
    rb = _base(ftj, "rbac.authorization.k8s.io/v1", "RoleBinding", n.role_binding, "trainer")
    rb["roleRef"] = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.role}
    rb["subjects"] = [
        {"kind": "ServiceAccount", "name": n.service_account, "namespace": ftj["metadata"]["namespace"]}
    ]
    return rb


def config_map(ftj: Body, trainer_config: dict[str, Any]) -> Body:
    cm = _base(ftj, "v1", "ConfigMap", names(ftj).config_map, "trainer")
    cm["data"] = {CONFIG_FILE: yaml.safe_dump(trainer_config, sort_keys=True)}
    return cm


def headless_service(ftj: Body, settings: Settings) -> Body:
    """Stable DNS for the workers (<job>-<index>.<service>): node 0 is the rendezvous point."""
    svc = _base(ftj, "v1", "Service", names(ftj).service, "trainer")
    svc["spec"] = {
        "clusterIP": "None",
        # Workers must find node 0 before any of them is Ready.
        "publishNotReadyAddresses": True,
        "selector": {meta.LABEL_FINETUNEJOB: ftj["metadata"]["name"], meta.LABEL_COMPONENT: "trainer"},
        "ports": [
            {"name": "rendezvous", "port": settings.rendezvous_port, "targetPort": settings.rendezvous_port}
        ],
    }
    return svc


def torchrun_command(ftj: Body, attempt: int, settings: Settings) -> list[str]:
    res = typed(ftj).spec.resources
    nodes = res.nodes
    nproc = res.gpus_per_node if res.gpus_per_node > 0 else 1
    # kubetune_trainer.launch is torchrun that exits with the trainer's own exit code
    # (plain torchrun exits 1 and would hide the non-retryable codes 2/3/4).
    cmd = ["python", "-m", "kubetune_trainer.launch", f"--nnodes={nodes}", f"--nproc-per-node={nproc}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        n = names(ftj)
        ns = ftj["metadata"]["namespace"]
        # Static rendezvous: pod 0 serves a TCPStore at <job>-0.<service> (the headless Service
        # publishes not-ready pods; the Job sets hostname <job>-<index>, the pod spec subdomain).
        # Until that name resolves, or every node has joined, the agents retry for `timeout`
        # seconds (torch's default is 600): long enough for a node to be scaled up and a large
        # image to be pulled on some of the nodes. $(NODE_RANK) is declared in the env below.
        cmd += [
            "--node-rank=$(NODE_RANK)",
            f"--master-addr={n.job(attempt)}-0.{n.service}.{ns}.svc",
            f"--master-port={settings.rendezvous_port}",
            f"--rdzv-conf=timeout={settings.rendezvous_timeout_seconds}",
        ]
    return [*cmd, "-m", "kubetune_trainer", "train", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"]


def _storage_env(ftj: Body, settings: Settings) -> list[Body]:
    storage = typed(ftj).spec.storage
    env: list[Body] = []
    endpoint = storage.endpoint or settings.default_s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    region = storage.region or settings.default_s3_region
    env += [{"name": "AWS_REGION", "value": region}, {"name": "AWS_DEFAULT_REGION", "value": region}]
    secret_name = storage.secret_ref.name if storage.secret_ref else settings.default_s3_secret
    if secret_name:
        # The operator's default Secret has the default key names.
        keys = storage.secret_ref or SecretRef(name=secret_name)
        # Credentials only ever reach the pod through a secretKeyRef: never in the spec or the ConfigMap.
        for var, key in (
            ("AWS_ACCESS_KEY_ID", keys.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", keys.secret_access_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}})
    return env


# MLflow's client reads its credentials from these variables; each comes from a key of the Secret.
MLFLOW_CREDENTIAL_ENV = (
    ("MLFLOW_TRACKING_USERNAME", "username_key"),
    ("MLFLOW_TRACKING_PASSWORD", "password_key"),
    ("MLFLOW_TRACKING_TOKEN", "token_key"),
)


def _tracking_env(ftj: Body) -> list[Body]:
    """The MLflow server's credentials, from the Secret in spec.tracking.mlflow.credentialsSecretRef."""
    tracking = typed(ftj).spec.tracking
    secret = tracking.mlflow.credentials_secret_ref if tracking and tracking.mlflow else None
    if secret is None:
        return []
    # optional: a Secret holds a user and password, or a token; the keys it lacks are left out.
    return [
        {
            "name": var,
            "valueFrom": {
                "secretKeyRef": {"name": secret.name, "key": getattr(secret, field), "optional": True}
            },
        }
        for var, field in MLFLOW_CREDENTIAL_ENV
    ]


def _resources(res: Resources, settings: Settings) -> Body:
    """Requests and limits of a trainer container: the spec's, else the operator's defaults."""
    gpus = res.gpus_per_node
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpu = res.cpu or settings.default_trainer_cpu
    memory = res.memory or settings.default_trainer_memory
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = limits["memory"] = str(memory)
    if gpus:
        name = res.gpu_resource_name
        requests[name] = limits[name] = str(gpus)
    out: Body = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def job(ftj: Body, attempt: int, settings: Settings, *, active_deadline_seconds: int | None = None) -> Body:
    """The Indexed Job of one attempt: one pod per node, torchrun inside, rendezvous at pod 0."""
    spec = typed(ftj).spec
    res = spec.resources
    n = names(ftj)
    pod_meta = spec.pod_metadata
    nodes = res.nodes
    ftj_name = ftj["metadata"]["name"]
    attempt_label = {meta.LABEL_ATTEMPT: str(attempt)}
    job_labels = dict(attempt_label)
    queue = spec.run_policy.queue_name
    if queue:
        job_labels["kueue.x-k8s.io/queue-name"] = queue

    env: list[Body] = [
        {"name": "KUBETUNE_JOB_NAME", "value": ftj_name},
        {"name": "KUBETUNE_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_JOB_UID", "value": ftj["metadata"]["uid"]},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_METRICS_PORT", "value": str(settings.trainer_metrics_port)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": GRACE_ENV, "value": str(settings.termination_grace_seconds)},
        *podspec.runtime_env(),
        *_storage_env(ftj, settings),
        *_tracking_env(ftj),
        *[_wire(e) for e in spec.env or []],
    ]
    container: Body = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": torchrun_command(ftj, attempt, settings),
        "workingDir": podspec.WORKSPACE,
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": settings.rendezvous_port},
            {"name": "metrics", "containerPort": settings.trainer_metrics_port},
        ],
        "resources": _resources(res, settings),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *podspec.writable_mounts(),
            {"name": "token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True},
        ],
        "securityContext": podspec.container_security_context(),
        # The trainer writes its report (output URIs, parameter counts) or its error here.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    shm: Body = {"medium": "Memory"}
    shm_size = res.shared_memory_size or settings.default_trainer_shm
    if shm_size:
        shm["sizeLimit"] = str(shm_size)
    pod_spec: Body = {
        "restartPolicy": "Never",
        "subdomain": n.service,
        "serviceAccountName": n.service_account,
        # Only the trainer's own projected token is mounted (below), with a bounded lifetime.
        "automountServiceAccountToken": False,
        # Services in the namespace would otherwise inject KUBETUNE_*_PORT=tcp://... env vars.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": podspec.pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": n.config_map}},
            {"name": "dshm", "emptyDir": shm},
            *podspec.writable_volumes(),
            {
                "name": "token",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                                ]
                            }
                        },
                    ]
                },
            },
        ],
    }
    # Models and data on PersistentVolumeClaims (pvc://claim/path) are mounted read-only.
    for claim in pvc_claims(spec):
        vol = meta.dns_name("pvc", claim)
        pod_spec["volumes"].append(
            {"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        container["volumeMounts"].append(
            {"name": vol, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        )
    for key, value in (
        ("nodeSelector", res.node_selector),
        ("tolerations", res.tolerations),
        ("affinity", res.affinity),
        ("priorityClassName", res.priority_class_name),
        ("schedulerName", res.scheduler_name),
        ("imagePullSecrets", spec.image_pull_secrets),
    ):
        if value:
            pod_spec[key] = _wire(value)

    j = _base(ftj, "batch/v1", "Job", n.job(attempt), "trainer", job_labels)
    j["spec"] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # Retries are the operator's (attempts that resume from a checkpoint), not the Job's.
        "backoffLimit": 0,
        # The Job itself records a non-retryable trainer exit code (reason PodFailurePolicy, the
        # code in the message), so the operator knows not to retry even without seeing the pod.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": sorted(NON_RETRYABLE_EXIT_CODES),
                    },
                }
            ]
        },
        # Kueue admits a queued Job by unsuspending it.
        "suspend": spec.run_policy.suspend or bool(queue),
        "template": {
            "metadata": {
                # Users' pod labels/annotations (cost centres, mesh opt-outs ...) never override ours.
                "labels": {
                    **((pod_meta and pod_meta.labels) or {}),
                    **meta.child_labels(meta.LABEL_FINETUNEJOB, ftj_name, "trainer"),
                    **attempt_label,
                },
                "annotations": dict((pod_meta and pod_meta.annotations) or {}),
            },
            "spec": pod_spec,
        },
    }
    if active_deadline_seconds is not None:
        j["spec"]["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return j


def _wire(value: Any) -> Any:
    """A typed spec value as the API server stores it (camelCase; only what the manifest set)."""
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return value
