"""The operator under stress: restarts of itself and of the API server, and the chart's own RBAC."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import eventually
from tests.integration.operator_support import (
    HOLD,
    apply,
    finetunejob,
    finish_pod,
    get,
    install_crds,
    make_s3_secret,
    pods,
    rbac_denials,
    status,
    wait_phase,
)
from tests.testground.cluster import REPO, ControlPlane, binaries_dir
from tests.testground.operator import OperatorProcess

pytestmark = pytest.mark.cluster


@pytest.fixture
def ns(cluster: ControlPlane, namespace: str) -> str:
    install_crds(cluster)
    make_s3_secret(cluster, namespace)
    return namespace


def running_pod(cluster: ControlPlane, ns: str, name: str) -> dict:
    def check():
        ps = [
            p
            for p in pods(cluster, ns, f"kubetune.io/finetunejob={name}")
            if p["status"].get("phase") == "Running"
        ]
        return ps[0] if ps else None

    return eventually(check, timeout=60, what=f"a running pod of {name}")


def jobs_of(cluster: ControlPlane, ns: str, name: str) -> list[str]:
    out = cluster.kubectl("get", "jobs", "-l", f"kubetune.io/finetunejob={name}", "-o", "name", namespace=ns)
    return out.stdout.split()


def test_restarting_the_operator_at_any_point_duplicates_nothing_and_loses_nothing(
    cluster: ControlPlane, ns: str, tmp_path: Path
) -> None:
    op = OperatorProcess(cluster.kubeconfig, tmp_path, namespaces=[ns], resync_seconds=5)
    # Kill it at several points of the first reconciles, then let a fresh one converge.
    for i, delay in enumerate((0.0, 0.2, 0.5, 1.0)):
        op.start()
        apply(cluster, ns, finetunejob(f"restart-{i}", pod_labels=HOLD))
        time.sleep(delay)
        op.stop()
    op.start()
    try:
        for i in range(4):
            name = f"restart-{i}"
            wait_phase(cluster, ns, name, "Running")
            assert jobs_of(cluster, ns, name) == [f"job.batch/{name}-1"]
        before = status(cluster, ns, "restart-0")
        op.stop()
        op.start()
        time.sleep(2)
        after = status(cluster, ns, "restart-0")
        assert after["startTime"] == before["startTime"] and after["attempt"] == 1
        pod = running_pod(cluster, ns, "restart-0")
        finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0)
        wait_phase(cluster, ns, "restart-0", "Succeeded")
        assert "Traceback" not in op.log_text()
    finally:
        op.stop()


def test_the_operator_survives_an_api_server_restart(cluster: ControlPlane, ns: str, tmp_path: Path) -> None:
    op = OperatorProcess(cluster.kubeconfig, tmp_path, namespaces=[ns], resync_seconds=5).start()
    try:
        apply(cluster, ns, finetunejob("survivor", pod_labels=HOLD))
        pod = running_pod(cluster, ns, "survivor")
        wait_phase(cluster, ns, "survivor", "Running")
        cluster.restart_apiserver()
        assert op.alive()
        # A change made after the restart is only seen through re-established watches.
        finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0)
        wait_phase(cluster, ns, "survivor", "Succeeded", timeout=90)
        apply(cluster, ns, finetunejob("after-restart", pod_labels=HOLD))
        wait_phase(cluster, ns, "after-restart", "Running", timeout=60)
        assert op.alive()
    finally:
        op.stop()


def render_chart(**values: str) -> list[dict]:
    helm = binaries_dir() / "helm"
    argv = [
        str(helm),
        "template",
        "kubetune",
        str(REPO / "charts" / "kubetune"),
        "--namespace",
        "kubetune-system",
    ]
    argv += ["--kube-version", "1.36.3"]  # a go-installed helm assumes 1.20 otherwise
    for k, v in values.items():
        argv += ["--set", f"{k}={v}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def token_kubeconfig(cluster: ControlPlane, path: Path, namespace: str, sa: str) -> Path:
    api = cluster.api_client()
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(sa, namespace, {"spec": {"expirationSeconds": 3600}})
        .status.token
    )
    cfg = yaml.safe_load(cluster.kubeconfig.read_text())
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    cfg["contexts"][0]["context"]["user"] = "operator"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_operator_runs_with_exactly_the_charts_rbac(
    cluster: ControlPlane, ns: str, tmp_path: Path
) -> None:
    docs = render_chart()
    rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    assert {d["kind"] for d in rbac} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    cluster.kubectl("create", "namespace", "kubetune-system", check=False)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    kubeconfig = token_kubeconfig(cluster, tmp_path / "operator.kubeconfig", "kubetune-system", "kubetune")
    # Watch what the chart's Deployment says: by default (ClusterRole mode) every namespace.
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    namespaces = [a.removeprefix("--namespace=") for a in container["args"] if a.startswith("--namespace=")]
    assert namespaces == [], "the default chart should run the operator cluster-wide"
    op = OperatorProcess(kubeconfig, tmp_path, namespaces=namespaces, resync_seconds=5).start()
    try:
        eventually(lambda: "namespaces: all" in op.log_text(), timeout=10, what="a cluster-wide operator")
        apply(
            cluster,
            ns,
            finetunejob("least-privilege", pod_labels=HOLD, runPolicy={"ttlSecondsAfterFinished": 6}),
        )
        pod = running_pod(cluster, ns, "least-privilege")
        wait_phase(cluster, ns, "least-privilege", "Running")
        finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0)
        # The TTL leaves the Succeeded phase up for seconds, not one poll: a busy machine can
        # take a second per kubectl call, and a 1-second TTL was missed that way.
        wait_phase(cluster, ns, "least-privilege", "Succeeded")
        eventually(
            lambda: get(cluster, ns, "finetunejob", "least-privilege") is None, timeout=60, what="TTL delete"
        )
        log = op.log_text()
        denied = rbac_denials(log)
        assert not denied, "\n".join(denied)[-3000:]
    finally:
        op.stop()
    # And it really is limited: the same token cannot read Secrets.
    res = cluster.kubectl("--kubeconfig", str(kubeconfig), "get", "secrets", namespace=ns, check=False)
    assert res.returncode != 0 and "forbidden" in res.stderr.lower()
