"""AdapterDeployment spec + resolved adapters -> Deployment, Service, ConfigMap, HPA. Pure functions.

Two runtimes speak the same OpenAI API and the same adapter load/unload endpoints:
- builtin: the trainer image runs `kubetune serve`, which fetches adapters itself at start.
- vllm: vLLM's OpenAI server with --enable-lora; an init container (`kubetune fetch`) downloads
  the adapters into a shared emptyDir first.

The adapter set always lives in a ConfigMap (adapters.json) mounted into the pods, so a pod
that restarts or a replica that scales out gets the full, current set. Rolling mode (default)
also stamps a hash of the set on the pod template, so a change rolls the pods; hot-reload mode
does not, and a sidecar (`kubetune adapter-sync`) loads and unloads adapters in the running
server through its /v1/load_lora_adapter and /v1/unload_lora_adapter endpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .. import meta, podspec
from ..api.finetunejob import LoraParams, Method, OutputStatus
from ..convert import resolve_uri
from ..settings import Settings

Body = dict[str, Any]

SERVER_PORT = 8000
ADAPTERS_DIR = "/adapters"
MODELS_DIR = "/models"
ADAPTER_SET_MOUNT = "/etc/kubetune"
ADAPTER_SET_FILE = "adapters.json"
AUTH_MOUNT = "/etc/kubetune/auth"  # the key files (a projected Secret volume): never args, env or ConfigMaps
API_KEYS_FILE = "api-keys"
ADMIN_KEYS_FILE = "admin-keys"
SIDECAR_KEY_ENV = "KUBETUNE_SERVER_API_KEY"  # what `kubetune adapter-sync` sends as its bearer token
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    uri: str
    rank: int | None = None


@dataclass(frozen=True)
class TrainedOutput:
    """What a finished FineTuneJob saved: its method and, for LoRA, its rank (None: unknown)."""

    method: str | None
    rank: int | None


# Both runtimes serve LoRA adapters only (a QLoRA adapter is a LoRA adapter: the quantization was
# the base model's during training). vLLM's --lora-modules and the builtin server's mixed-adapter
# batches (PEFT adapter_names=) have no prefix/prompt/P-tuning counterpart.
SERVABLE_METHODS = ("lora", "qlora")


def trained_output(method: Method | None, output: OutputStatus | None) -> TrainedOutput:
    """The trainer's report (status.output.method/rank, read back from the saved adapter) first;
    a report without them (a trainer image older than those fields) falls back to the spec."""
    if output is not None and output.method is not None:
        return TrainedOutput(output.method, output.rank)
    if method is None:
        return TrainedOutput(None, None)
    block = method.qlora if method.type == "qlora" else method.lora if method.type == "lora" else None
    if method.type in SERVABLE_METHODS:
        return TrainedOutput(method.type, (block or LoraParams()).r)
    return TrainedOutput(method.type, None)


def unservable(runtime: str, trained: TrainedOutput, what: str, uri: str) -> str | None:
    """Why ``runtime`` cannot serve ``what``'s output at ``uri`` as an adapter (None: it can)."""
    if trained.method is None or trained.method in SERVABLE_METHODS:
        return None
    if trained.method == "full":
        return (
            f"{what} is a full fine-tune: its output {uri} is a whole model, not an adapter. Serve it as "
            f"the base model (spec.baseModel.uri: {uri}) of an AdapterDeployment, and remove this adapter"
        )
    return (
        f"{what} trained a {trained.method} adapter, which runtime {runtime} cannot serve (it serves LoRA "
        "adapters only): train with method lora or qlora, or remove this adapter"
    )


def names(adep: Body) -> dict[str, str]:
    name = adep["metadata"]["name"]
    return {
        "deployment": meta.dns_name(name),
        "service": meta.dns_name(name),
        "config_map": meta.dns_name(name, "adapters"),
        "hpa": meta.dns_name(name),
        "network_policy": meta.dns_name(name),
    }


def _base(adep: Body, api_version: str, kind: str, name: str) -> Body:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": adep["metadata"]["namespace"],
            "labels": meta.child_labels(meta.LABEL_ADAPTERDEPLOYMENT, adep["metadata"]["name"], "server"),
            "ownerReferences": [meta.owner_reference(adep)],
        },
    }


def adapter_set(adapters: list[ResolvedAdapter]) -> str:
    """The adapter set as the server and the sync sidecar read it (stable order)."""
    return json.dumps(
        {"adapters": [{"name": a.name, "uri": a.uri} for a in sorted(adapters, key=lambda a: a.name)]},
        indent=2,
        sort_keys=True,
    )


def adapter_set_hash(adapters: list[ResolvedAdapter]) -> str:
    return hashlib.sha256(adapter_set(adapters).encode()).hexdigest()[:16]


def config_map(adep: Body, adapters: list[ResolvedAdapter]) -> Body:
    cm = _base(adep, "v1", "ConfigMap", names(adep)["config_map"])
    cm["data"] = {ADAPTER_SET_FILE: adapter_set(adapters)}
    return cm


def service(adep: Body) -> Body:
    svc_spec = adep["spec"].get("service") or {}
    svc = _base(adep, "v1", "Service", names(adep)["service"])
    svc["spec"] = {
        "type": svc_spec.get("type", "ClusterIP"),
        "selector": {meta.LABEL_ADAPTERDEPLOYMENT: adep["metadata"]["name"], meta.LABEL_COMPONENT: "server"},
        "ports": [{"name": "http", "port": int(svc_spec.get("port", SERVER_PORT)), "targetPort": "http"}],
    }
    return svc


def endpoint(adep: Body) -> str:
    port = int((adep["spec"].get("service") or {}).get("port", SERVER_PORT))
    return f"http://{names(adep)['service']}.{adep['metadata']['namespace']}.svc:{port}/v1"


def hpa(adep: Body) -> Body | None:
    auto = adep["spec"].get("autoscaling")
    if not auto:
        return None
    h = _base(adep, "autoscaling/v2", "HorizontalPodAutoscaler", names(adep)["hpa"])
    h["spec"] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names(adep)["deployment"]},
        "minReplicas": int(auto.get("minReplicas", 1)),
        "maxReplicas": int(auto.get("maxReplicas", 2)),
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": int(auto.get("targetCPUUtilizationPercentage", 80)),
                    },
                },
            }
        ],
    }
    return h


def network_policy(adep: Body) -> Body | None:
    """spec.networkPolicy -> a NetworkPolicy admitting only the listed clients to the API port."""
    spec = adep["spec"].get("networkPolicy")
    if spec is None:
        return None
    peers = [
        {k: dict(p[k]) for k in ("namespaceSelector", "podSelector") if k in p}
        for p in spec.get("allowFrom") or []
    ] or [{"podSelector": {}}]  # default: pods of this namespace
    np = _base(adep, "networking.k8s.io/v1", "NetworkPolicy", names(adep)["network_policy"])
    np["spec"] = {
        "podSelector": {
            "matchLabels": {
                meta.LABEL_ADAPTERDEPLOYMENT: adep["metadata"]["name"],
                meta.LABEL_COMPONENT: "server",
            }
        },
        "policyTypes": ["Ingress"],
        "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": SERVER_PORT}]}],
    }
    return np


def _auth(adep: Body) -> tuple[Body | None, Body | None]:
    """(apiKeySecretRef, adminKeySecretRef) with their defaults, or (None, None) without spec.auth."""
    auth = adep["spec"].get("auth")
    if not auth:
        return None, None
    api = {"key": "api-keys", **auth["apiKeySecretRef"]}
    admin = auth.get("adminKeySecretRef")
    return api, ({"key": "admin-key", **admin} if admin else None)


def _secret_env(var: str, ref: Body) -> Body:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}


def _auth_volume(api: Body, admin: Body | None) -> Body:
    sources = [{"secret": {"name": api["name"], "items": [{"key": api["key"], "path": API_KEYS_FILE}]}}]
    if admin:
        sources.append(
            {"secret": {"name": admin["name"], "items": [{"key": admin["key"], "path": ADMIN_KEYS_FILE}]}}
        )
    # 0440 + the pod's fsGroup: readable by the server's group only.
    return {"name": "auth", "projected": {"sources": sources, "defaultMode": 0o440}}


def _storage_env(adep: Body, settings: Settings) -> list[Body]:
    storage = adep["spec"].get("storage") or {}
    env: list[Body] = []
    endpoint_url = storage.get("endpoint") or settings.default_s3_endpoint
    if endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint_url})
    region = storage.get("region") or settings.default_s3_region
    env += [{"name": "AWS_REGION", "value": region}, {"name": "AWS_DEFAULT_REGION", "value": region}]
    secret = storage.get("secretRef") or {}
    secret_name = secret.get("name") or settings.default_s3_secret
    if secret_name:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", secret.get("accessKeyIdKey") or "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", secret.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY"),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}})
    return env


def _resources(res: Body) -> Body:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.get("cpu"):
        requests["cpu"] = str(res["cpu"])
    if res.get("memory"):
        requests["memory"] = limits["memory"] = str(res["memory"])
    gpus = int(res.get("gpus", 0))
    if gpus:
        gname = res.get("gpuResourceName") or "nvidia.com/gpu"
        requests[gname] = limits[gname] = str(gpus)
    out: Body = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


# vLLM sizes its LoRA slots at start; with hot reload the adapters to come are unknown, so
# spec.vllm.maxLoras / maxLoraRank decide, else these (rank 64: vLLM's largest common size).
HOT_RELOAD_MAX_LORAS = 8


def vllm_max_lora_rank(adapters: list[ResolvedAdapter], override: int | None = None) -> int:
    """vLLM needs the largest adapter rank up front, rounded up to a size it supports."""
    if override:
        return override
    rank = max((a.rank or 0 for a in adapters), default=0) or 64
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def base_model_flags(base: Body) -> list[str]:
    """spec.baseModel's loading options as flags; `kubetune serve` and vLLM spell them the same."""
    flags: list[str] = []
    if base.get("revision") and str(base.get("uri", "")).startswith("hf://"):
        flags += ["--revision", str(base["revision"])]  # a hub revision: other schemes have none
    if base.get("dtype", "auto") != "auto":
        flags += ["--dtype", str(base["dtype"])]
    if base.get("trustRemoteCode"):
        flags.append("--trust-remote-code")
    return flags


def deployment(adep: Body, adapters: list[ResolvedAdapter], settings: Settings) -> Body:
    spec = adep["spec"]
    n = names(adep)
    runtime = spec.get("runtime", "builtin")
    hot = bool(spec.get("hotReload", False))
    res = spec.get("resources") or {}
    base_uri = (spec.get("baseModel") or {}).get("uri", "")
    served_name = (spec.get("baseModel") or {}).get("servedName") or adep["metadata"]["name"]
    # Every container (init, server, sidecar) gets the same HOME, caches and writable mounts;
    # the user's env comes last, so it may override them.
    base_env = [*_storage_env(adep, settings), *podspec.runtime_env()]
    user_env = [dict(e) for e in spec.get("env") or []]
    env = [*base_env, *user_env]
    mounts: list[Body] = [
        {"name": "adapter-set", "mountPath": ADAPTER_SET_MOUNT, "readOnly": True},
        {"name": "adapters", "mountPath": ADAPTERS_DIR},
        *podspec.writable_mounts(),
    ]
    trainer_image = spec.get("image") or settings.trainer_image
    api_ref, admin_ref = _auth(adep)
    init_containers: list[Body] = []
    sidecars: list[Body] = []
    probes = {
        "readinessProbe": {
            "httpGet": {"path": "/ready" if runtime == "builtin" else "/health", "port": "http"},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 20,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
    }
    if runtime == "vllm":
        model = resolve_uri(base_uri, in_pod=True)
        if base_uri.startswith("s3://"):
            init_containers.append(
                _fetch_container(
                    "fetch-base-model", trainer_image, settings, env, [f"base={base_uri}"], MODELS_DIR, mounts
                )
            )
            model = f"{MODELS_DIR}/base"
            mounts = [*mounts, {"name": "models", "mountPath": MODELS_DIR}]
        # Hot reload: the adapter-sync sidecar fetches and loads adapters, and nothing in the pod
        # template may depend on the adapter list (a change would roll the pods anyway).
        started_with = [] if hot else adapters
        if started_with:
            init_containers.append(
                _fetch_container(
                    "fetch-adapters",
                    trainer_image,
                    settings,
                    env,
                    [f"{a.name}={a.uri}" for a in started_with],
                    ADAPTERS_DIR,
                    mounts,
                )
            )
        vllm = spec.get("vllm") or {}
        args = [
            "--model",
            model,
            "--served-model-name",
            served_name,
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVER_PORT),
            "--enable-lora",
            "--max-loras",
            str(int(vllm.get("maxLoras") or (HOT_RELOAD_MAX_LORAS if hot else len(adapters) or 1))),
            "--max-lora-rank",
            str(vllm_max_lora_rank(started_with, vllm.get("maxLoraRank"))),
            *base_model_flags(spec.get("baseModel") or {}),
        ]
        if started_with:
            args += ["--lora-modules", *[f"{a.name}={ADAPTERS_DIR}/{a.name}" for a in started_with]]
        args += [str(a) for a in vllm.get("extraArgs") or []]
        main = {
            "name": "server",
            "image": vllm.get("image") or settings.vllm_image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            "args": args,
            "env": [
                *base_env,
                {"name": "VLLM_CACHE_ROOT", "value": podspec.VLLM_CACHE_ROOT},
                *user_env,
                # vLLM then requires the key on every /v1 route, its load/unload routes included.
                *([_secret_env("VLLM_API_KEY", api_ref)] if api_ref else []),
                # Runtime load/unload is off in vLLM unless this is set: only hot reload needs it.
                *([{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}] if hot else []),
            ],
        }
    else:
        args = [
            "serve",
            "--base-model",
            resolve_uri(base_uri, in_pod=True),
            "--served-name",
            served_name,
            "--adapter-set",
            f"{ADAPTER_SET_MOUNT}/{ADAPTER_SET_FILE}",
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVER_PORT),
            *base_model_flags(spec.get("baseModel") or {}),
        ]
        if hot:  # load/unload on, from the sidecar's copies only
            args += ["--runtime-adapter-updates", "--adapter-root", ADAPTERS_DIR]
        if api_ref:
            args += ["--api-key-file", f"{AUTH_MOUNT}/{API_KEYS_FILE}"]
        if admin_ref:
            args += ["--admin-key-file", f"{AUTH_MOUNT}/{ADMIN_KEYS_FILE}"]
        main = {
            "name": "server",
            "image": trainer_image,
            "imagePullPolicy": spec.get("imagePullPolicy") or settings.image_pull_policy,
            "command": ["kubetune"],
            "args": args,
            "env": env,
        }
    main.update(
        workingDir=podspec.WORKSPACE,
        ports=[{"name": "http", "containerPort": SERVER_PORT}],
        resources=_resources(res),
        volumeMounts=mounts,
        securityContext=podspec.container_security_context(),
        **probes,
    )
    if api_ref and runtime == "builtin":
        main["volumeMounts"] = [*mounts, {"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True}]
    if hot:
        sidecars.append(
            {
                "name": "adapter-sync",
                "image": trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["kubetune"],
                "args": [
                    "adapter-sync",
                    "--adapter-set",
                    f"{ADAPTER_SET_MOUNT}/{ADAPTER_SET_FILE}",
                    "--server",
                    f"http://127.0.0.1:{SERVER_PORT}",
                    "--dest",
                    ADAPTERS_DIR,
                ],
                "workingDir": podspec.WORKSPACE,
                # The sidecar loads and unloads: it sends the admin key (else the API key).
                "env": [*env, *([_secret_env(SIDECAR_KEY_ENV, admin_ref or api_ref)] if api_ref else [])],
                "volumeMounts": mounts,
                "securityContext": podspec.container_security_context(),
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
            }
        )
    template_annotations: Body = {}
    if not hot:
        # Rolling mode: a new adapter set is a new pod template, so the Deployment rolls.
        template_annotations["kubetune.io/adapter-set"] = adapter_set_hash(adapters)
    volumes = [
        {"name": "adapter-set", "configMap": {"name": n["config_map"]}},
        {"name": "adapters", "emptyDir": {}},
        *podspec.writable_volumes(),
    ]
    if any(m["name"] == "models" for m in mounts):
        volumes.append({"name": "models", "emptyDir": {}})
    if api_ref and runtime == "builtin":
        volumes.append(_auth_volume(api_ref, admin_ref))
    pod_spec: Body = {
        "automountServiceAccountToken": False,
        # Services in the namespace would otherwise inject KUBETUNE_*_PORT=tcp://... env vars.
        "enableServiceLinks": False,
        "securityContext": podspec.pod_security_context(),
        "initContainers": init_containers,
        "containers": [main, *sidecars],
        "volumes": volumes,
    }
    if not init_containers:
        del pod_spec["initContainers"]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = spec["imagePullSecrets"]
    labels = meta.child_labels(meta.LABEL_ADAPTERDEPLOYMENT, adep["metadata"]["name"], "server")
    d = _base(adep, "apps/v1", "Deployment", n["deployment"])
    d["spec"] = {
        "selector": {
            "matchLabels": {
                meta.LABEL_ADAPTERDEPLOYMENT: adep["metadata"]["name"],
                meta.LABEL_COMPONENT: "server",
            }
        },
        # No downtime on changes: a new pod must be ready before an old one goes.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {"metadata": {"labels": labels, "annotations": template_annotations}, "spec": pod_spec},
    }
    if not spec.get("autoscaling"):
        # With autoscaling the HPA owns .spec.replicas: server-side apply leaves it alone.
        d["spec"]["replicas"] = int(spec.get("replicas", 1))
    return d


def _fetch_container(
    name: str,
    image: str,
    settings: Settings,
    env: list[Body],
    pairs: list[str],
    dest: str,
    mounts: list[Body],
) -> Body:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune"],
        "args": ["fetch", "--dest", dest, *pairs],
        "workingDir": podspec.WORKSPACE,
        "env": env,
        "volumeMounts": mounts
        if any(m["mountPath"] == dest for m in mounts)
        else [*mounts, {"name": "models", "mountPath": dest}],
        "securityContext": podspec.container_security_context(),
    }
