"""What real pods need from the rendered specs: a user that can write where its processes write,
the trainer's grace period, and a rendezvous address that resolves through cluster DNS."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kubetune_operator import meta, podspec
from kubetune_operator.adapterdeployment import builders as ab
from kubetune_operator.convert import POD_OUTPUT_DIR
from kubetune_operator.finetunejob import builders as fb
from kubetune_trainer import launch

from .test_operator_builders import SETTINGS, ftj

REPO = Path(__file__).resolve().parents[2]

# Every variable that names a directory some process in the pod writes.
PATH_VARS = (
    "HOME",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "KUBETUNE_CACHE",
    "TORCH_EXTENSIONS_DIR",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "MPLCONFIGDIR",
)


def adep(runtime: str, *, hot: bool = False, base: str = "s3://models/llama-1b") -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-9", "generation": 1},
        "spec": {"runtime": runtime, "hotReload": hot, "baseModel": {"uri": base}},
    }


ADAPTERS = [ab.ResolvedAdapter("a", "s3://ckpt/a/final/", 16)]


def rendered_pods() -> dict[str, dict]:
    """One pod spec of every shape the operator renders."""
    return {
        "trainer": fb.job(ftj(), 1, SETTINGS)["spec"]["template"]["spec"],
        "trainer-2-nodes": fb.job(ftj(resources={"nodes": 2, "gpusPerNode": 1}), 1, SETTINGS)["spec"][
            "template"
        ]["spec"],
        "builtin": ab.deployment(adep("builtin"), ADAPTERS, SETTINGS)["spec"]["template"]["spec"],
        "builtin-hot": ab.deployment(adep("builtin", hot=True), ADAPTERS, SETTINGS)["spec"]["template"][
            "spec"
        ],
        "vllm": ab.deployment(adep("vllm"), ADAPTERS, SETTINGS)["spec"]["template"]["spec"],
        "vllm-hot": ab.deployment(adep("vllm", hot=True), ADAPTERS, SETTINGS)["spec"]["template"]["spec"],
    }


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def writable_dirs(pod: dict, container: dict) -> list[str]:
    """Mount paths of the container's writable emptyDir volumes."""
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    return [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty and not m.get("readOnly")]


def under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


@pytest.mark.parametrize("shape", list(rendered_pods()))
def test_every_pod_runs_as_the_images_user_and_writes_only_to_its_volumes(shape: str) -> None:
    pod = rendered_pods()[shape]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert containers(pod), shape
    for c in containers(pod):
        where = f"{shape}/{c['name']}"
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }, where
        env = {e["name"]: e.get("value") for e in c["env"]}
        dirs = writable_dirs(pod, c)
        # Set in the pod, not left to the image's ENV (the vLLM image has none of them).
        for var in PATH_VARS:
            assert env.get(var), f"{where}: {var} is not set"
            assert under(env[var], dirs), f"{where}: {var}={env[var]} is not on a writable volume {dirs}"
        assert env["HOME"] == "/home/kubetune" and env["TMPDIR"] == "/tmp"
        assert under(c["workingDir"], dirs), where
        assert "/tmp" in dirs and "/home/kubetune" in dirs, where
        if c["name"] == "server" and shape.startswith("vllm"):
            assert under(env["VLLM_CACHE_ROOT"], dirs), where


def test_the_trainer_writes_its_output_and_shared_memory_on_volumes() -> None:
    pod = rendered_pods()["trainer"]
    [c] = pod["containers"]
    assert under(POD_OUTPUT_DIR, writable_dirs(pod, c))
    assert "/dev/shm" in writable_dirs(pod, c)


def test_users_env_still_overrides_the_operators_paths() -> None:
    spec_env = [{"name": "HF_HOME", "value": "/workspace/hf"}]
    [c] = fb.job(ftj(env=spec_env), 1, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert [e["value"] for e in c["env"] if e["name"] == "HF_HOME"][-1] == "/workspace/hf"
    a = adep("vllm")
    a["spec"]["env"] = spec_env
    server = ab.deployment(a, ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert [e["value"] for e in server["env"] if e["name"] == "HF_HOME"][-1] == "/workspace/hf"
    # Without hot reload vLLM's runtime adapter routes stay off (nothing needs them) ...
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in server["env"]}
    # ... and with it they stay on whatever the user's env says.
    a["spec"]["hotReload"] = True
    server = ab.deployment(a, ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert server["env"][-1] == {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}


def _dockerfile_instructions(path: Path, *keywords: str) -> list[list[str]]:
    """The Dockerfile's instructions of these kinds (continuation lines joined, comments dropped)."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    lines = text.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.split(" ", 1)[0].upper() in keywords]


def test_pods_and_the_trainer_image_agree_on_user_and_paths() -> None:
    instructions = _dockerfile_instructions(REPO / "trainer-image" / "Dockerfile", "USER", "ENV")
    users = [i[1] for i in instructions if i[0] == "USER"]
    assert users and users[-1].split(":")[0] == str(podspec.POD_UID)
    image_env = dict(kv.split("=", 1) for i in instructions if i[0] == "ENV" for kv in i[1:])
    ours = {e["name"]: e["value"] for e in podspec.runtime_env()}
    for var in set(image_env) & set(ours):
        assert image_env[var] == ours[var], var


def test_the_trainer_knows_the_pods_grace_period() -> None:
    pod = rendered_pods()["trainer"]
    [c] = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert fb.GRACE_ENV == launch.GRACE_ENV
    assert env[launch.GRACE_ENV] == str(pod["terminationGracePeriodSeconds"]) == "300"


# ---- multi-node rendezvous ------------------------------------------------------------------------

VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@pytest.mark.parametrize("shape", list(rendered_pods()))
def test_every_variable_reference_is_declared_in_the_containers_env(shape: str) -> None:
    """The kubelet expands $(VAR) only for variables the container declares (in env values, only
    those declared earlier); anything else reaches the process verbatim."""
    for c in containers(rendered_pods()[shape]):
        names = [e["name"] for e in c["env"]]
        for arg in [*c.get("command", []), *c.get("args", [])]:
            for ref in VAR_REF.findall(arg):
                assert ref in names, f"{shape}/{c['name']}: {arg} uses undeclared ${ref}"
        for i, e in enumerate(c["env"]):
            for ref in VAR_REF.findall(e.get("value") or ""):
                assert ref in names[:i], f"{shape}/{c['name']}: {e['name']} uses ${ref} before it is declared"


def _arg(command: list[str], flag: str) -> str:
    [value] = [a.split("=", 1)[1] for a in command if a.startswith(flag + "=")]
    return value


def test_the_rendezvous_address_is_pod_0s_dns_name_published_before_it_is_ready() -> None:
    job_obj = fb.job(
        ftj(resources={"nodes": 2, "gpusPerNode": 8}, podMetadata={"labels": {"team": "a"}}), 3, SETTINGS
    )
    svc = fb.headless_service(ftj(), SETTINGS)
    pod = job_obj["spec"]["template"]["spec"]
    [c] = pod["containers"]
    host, _, rest = _arg(c["command"], "--master-addr").partition(".")
    subdomain, namespace, suffix = rest.split(".")
    # An Indexed Job names its pods' hosts <job>-<index>; DNS has <host>.<subdomain>.<ns>.svc
    # only when the pod's subdomain is a headless Service in its namespace that selects it.
    assert job_obj["spec"]["completionMode"] == "Indexed"
    assert host == f"{job_obj['metadata']['name']}-0" and len(host) <= 63
    assert "hostname" not in pod  # the Job controller sets it per index
    assert pod["subdomain"] == subdomain == svc["metadata"]["name"]
    assert namespace == svc["metadata"]["namespace"] == job_obj["metadata"]["namespace"] and suffix == "svc"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # workers look pod 0 up before it is Ready
    labels = job_obj["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert labels[meta.LABEL_COMPONENT] == "trainer"
    port = int(_arg(c["command"], "--master-port"))
    assert port == svc["spec"]["ports"][0]["port"] == svc["spec"]["ports"][0]["targetPort"]
    assert {"name": "rendezvous", "containerPort": port} in c["ports"]


def test_nodes_wait_for_each_other_longer_than_torchs_default() -> None:
    """Static rendezvous retries (a name that does not resolve yet, a refused connection) for
    rdzv-conf `timeout` seconds, 600 by default: not enough when a node is scaled up or pulls a
    large image while the others wait."""
    [c] = fb.job(ftj(resources={"nodes": 2, "gpusPerNode": 8}), 1, SETTINGS)["spec"]["template"]["spec"][
        "containers"
    ]
    assert "--rdzv-backend" not in " ".join(c["command"])  # static: --master-addr is the store
    assert _arg(c["command"], "--rdzv-conf") == f"timeout={SETTINGS.rendezvous_timeout_seconds}"
    assert SETTINGS.rendezvous_timeout_seconds == 1800
    env = [e["name"] for e in c["env"]]
    assert "NODE_RANK" in env


@pytest.mark.parametrize("shape", sorted(rendered_pods()))
def test_no_service_link_env_vars_shadow_the_pods_settings(shape: str) -> None:
    """A Service named kubetune-metrics would inject KUBETUNE_METRICS_PORT=tcp://... (seen on the
    real node: the operator, released as `kubetune`, crashed parsing it)."""
    assert rendered_pods()[shape]["enableServiceLinks"] is False


def test_the_charts_operator_pod_gets_no_service_link_env_vars() -> None:
    deployment = (REPO / "charts" / "kubetune" / "templates" / "deployment.yaml").read_text()
    assert "enableServiceLinks: false" in deployment
