"""The test ground's real node: what pods get from it (cluster DNS, Services, the API server
through its in-cluster address) and that tearing it down leaves nothing on the host."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.conftest import eventually
from tests.testground import node as node_mod
from tests.testground.cluster import ControlPlane
from tests.testground.images import app_version
from tests.testground.node import RealNode, scheduling
from tests.testground.procs import TestgroundError
from tests.testground.registry import Registry

pytestmark = pytest.mark.cluster

# Runs in the trainer image: resolves names through the cluster DNS and calls the API server
# with the pod's ServiceAccount token, the way the trainer and the operator do in a pod.
PROBE = textwrap.dedent(
    """
    import json, os, socket, ssl, urllib.request
    out = {"uid": os.getuid(), "rank": os.environ["RANK_FROM_ANNOTATION"]}
    ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
    for name in ("published", "unpublished"):
        try:
            out[name] = socket.gethostbyname(f"probe-0.{name}.{ns}.svc.cluster.local")
        except OSError as e:
            out[name] = f"error: {e}"
    ctx = ssl.create_default_context(cafile="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    token = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()
    host = os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]
    req = urllib.request.Request(f"https://{host}/api/v1/namespaces/{ns}/pods/probe",
                                 headers={"Authorization": "Bearer " + token})
    out["podIP"] = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["status"]["podIP"]
    open("/dev/termination-log", "w").write(json.dumps(out))
    """
)


def test_pod_resolves_a_not_ready_peer_only_through_a_service_that_publishes_it(
    cluster: ControlPlane, real_node: RealNode, registry: Registry, namespace: str
) -> None:
    """Rendezvous before pod 0 is Ready needs publishNotReadyAddresses (the trainer's Service sets it)."""
    for name, publish in (("published", True), ("unpublished", False)):
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"clusterIP": "None", "selector": {"app": "probe"}, "publishNotReadyAddresses": publish},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(svc), namespace=namespace)
    cluster.kubectl("create", "role", "read-pods", "--verb=get", "--resource=pods", namespace=namespace)
    cluster.kubectl(
        "create", "rolebinding", "read-pods", "--role=read-pods", f"--serviceaccount={namespace}:default",
        namespace=namespace,
    )  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "labels": {"app": "probe"}, "annotations": {"rank": "3"}},
        "spec": {
            "hostname": "probe-0",
            "subdomain": "published",
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            **scheduling(),
            "containers": [
                {
                    "name": "probe",
                    "image": registry.ref("kubetune/trainer", app_version()),
                    "command": ["python", "-c", PROBE],
                    "env": [
                        {
                            "name": "RANK_FROM_ANNOTATION",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['rank']"}},
                        }
                    ],
                    # Never Ready: only a Service that publishes not-ready addresses names it.
                    "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1},
                    "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod), namespace=namespace)

    def finished():
        p = json.loads(cluster.kubectl("get", "pod", "probe", "-o", "json", namespace=namespace).stdout)
        term = (p["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("terminated")
        return (p, term) if term else None

    p, term = eventually(finished, timeout=180, interval=1, what="the probe pod to finish")
    assert term["exitCode"] == 0, cluster.kubectl("logs", "probe", namespace=namespace, check=False).stdout
    out = json.loads(term["message"])
    assert out["uid"] == 65532 and out["rank"] == "3"
    assert out["published"] == p["status"]["podIP"] == out["podIP"]
    assert out["unpublished"].startswith("error"), out


def test_a_torn_down_node_leaves_nothing_on_the_host(tmp_path) -> None:
    """Its own cluster and node: run a pod, stop everything, look for what is left."""
    cp = ControlPlane(tmp_path / "cluster").start()
    assert cp.network is not None
    reg = Registry(tmp_path / "registry", host=cp.network.host_ip).start()
    try:
        node = cp.start_node(registry_port=reg.port)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default"},
            "spec": {
                **scheduling(),
                "containers": [{"name": "c", "image": reg.ref(*node_mod.PAUSE_IMAGE.split(":"))}],
            },
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(pod))
        eventually(
            lambda: cp.kubectl("get", "pod", "sleeper", "-o", "jsonpath={.status.phase}").stdout == "Running",
            timeout=60,
            what="a pod on the real node",
        )
        assert node.crictl("pods", "-q").stdout.strip(), "the pod's sandbox should exist"
    finally:
        cp.stop()
        reg.stop()
    assert node.leftovers() == []
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert "KUBE-" not in rules and "CNI-" not in rules, "kube-proxy/CNI rules leaked into the host"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps, [line for line in ps.splitlines() if str(tmp_path) in line]


def test_a_host_that_cannot_run_containers_is_told_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(TestgroundError, match="needs root"):
        node_mod.host_can_run_containers()
    monkeypatch.setattr(node_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(node_mod.shutil, "which", lambda cmd: None if cmd == "runc" else f"/usr/bin/{cmd}")
    with pytest.raises(TestgroundError, match=r"missing for the real node: runc.*hack/host-packages.sh"):
        node_mod.host_can_run_containers()
