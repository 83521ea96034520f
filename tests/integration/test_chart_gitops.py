"""GitOps on the real control plane: the operator causes no drift, and Argo CD's health checks
(deploy/argocd) read the statuses the real operator writes.

Argo CD (with server-side diff) compares what it applied with the live object. Here the
manifests are applied with `kubectl apply --server-side` under a GitOps tool's field manager,
the operator reconciles them to Running / Ready / Succeeded, and then `kubectl diff
--server-side` of the same manifests must show nothing: the operator never writes spec,
labels or annotations, adds no finalizers, and owns only fields of the status subresource.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import eventually
from tests.integration.operator_support import (
    finetunejob,
    finish_pod,
    get,
    install_crds,
    make_s3_secret,
    pods,
    wait_phase,
)
from tests.testground.cluster import ControlPlane
from tests.testground.operator import OperatorProcess
from tests.unit.test_argocd_health import run_health

pytestmark = pytest.mark.cluster

MANAGER = "argocd-controller"
# What Argo CD puts on the resources of an Application (label tracking and annotation tracking).
GITOPS_LABELS = {"app.kubernetes.io/instance": "ml-team", "team": "nlp"}
GITOPS_ANNOTATIONS = {"argocd.argoproj.io/tracking-id": "ml-team:kubetune.io/FineTuneJob:ns/x"}


def manifests() -> list[dict]:
    job = finetunejob("drift-job", pod_labels={"kwok.kubetune.io/outcome": "hold"})
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "drift-serve"},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama"},
            "adapters": [{"name": "sql", "source": "s3://adapters/sql-v1/"}],
            "replicas": 2,
            "storage": {"secretRef": {"name": "s3-credentials"}},
        },
    }
    for obj in (job, adep):
        obj["metadata"]["labels"] = dict(GITOPS_LABELS)
        obj["metadata"]["annotations"] = dict(GITOPS_ANNOTATIONS)
    return [job, adep]


def server_side_apply(cluster: ControlPlane, ns: str, path: Path) -> None:
    cluster.kubectl("apply", "--server-side", f"--field-manager={MANAGER}", "-f", str(path), namespace=ns)


def assert_no_drift(cluster: ControlPlane, ns: str, path: Path, applied: list[dict]) -> None:
    diff = cluster.kubectl(
        "diff", "--server-side", f"--field-manager={MANAGER}", "-f", str(path), namespace=ns, check=False
    )
    assert diff.returncode == 0 and diff.stdout == "", f"drift:\n{diff.stdout}{diff.stderr}"
    for want in applied:
        kind, name = want["kind"].lower(), want["metadata"]["name"]
        out = cluster.kubectl("get", kind, name, "-o", "json", "--show-managed-fields", namespace=ns)
        meta = json.loads(out.stdout)["metadata"]
        # Exactly what was applied: no kopf annotations, no copied or added labels, no finalizers.
        assert meta.get("labels") == want["metadata"]["labels"]
        assert meta.get("annotations") == want["metadata"]["annotations"]
        assert not meta.get("finalizers")
        others = [m for m in meta["managedFields"] if m["manager"] != MANAGER]
        assert others, "the operator wrote no status at all"
        assert all(m.get("subresource") == "status" for m in others), json.dumps(others, indent=1)


def health(cluster: ControlPlane, ns: str, kind: str, name: str) -> dict[str, str]:
    obj = get(cluster, ns, kind.lower(), name)
    assert obj is not None
    return run_health(kind, obj)


@pytest.mark.slow
def test_the_operator_causes_no_drift_and_argocd_health_follows_it(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    install_crds(cluster)
    make_s3_secret(cluster, namespace)
    objs = manifests()
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump_all(objs))
    server_side_apply(cluster, namespace, path)
    # Before any operator ran: waiting, not Healthy.
    assert health(cluster, namespace, "FineTuneJob", "drift-job")["status"] == "Progressing"
    assert health(cluster, namespace, "AdapterDeployment", "drift-serve") == {
        "status": "Progressing",
        "message": "Waiting for the kubetune operator to reconcile the AdapterDeployment",
    }

    op = OperatorProcess(cluster.kubeconfig, tmp_path, namespaces=[namespace], resync_seconds=1).start()
    try:
        wait_phase(cluster, namespace, "drift-job", "Running")

        def adep_healthy():
            h = health(cluster, namespace, "AdapterDeployment", "drift-serve")
            return h if h["status"] == "Healthy" else None

        h = eventually(adep_healthy, timeout=60, what="AdapterDeployment drift-serve to be Healthy")
        assert h["message"].startswith("Ready: 1/1 adapters served at http://drift-serve.")
        assert health(cluster, namespace, "FineTuneJob", "drift-job") == {
            "status": "Progressing",
            "message": "AllWorkersRunning: 1 of 1 workers running (attempt 1)",
        }
        time.sleep(3)  # a few resyncs: reconciling again must change nothing either
        assert_no_drift(cluster, namespace, path, objs)

        # Suspend through Git (a spec change by the GitOps tool), then resume.
        objs[0]["spec"]["runPolicy"] = {"suspend": True}
        path.write_text(yaml.safe_dump_all(objs))
        server_side_apply(cluster, namespace, path)
        wait_phase(cluster, namespace, "drift-job", "Suspended")
        h = health(cluster, namespace, "FineTuneJob", "drift-job")
        assert h["status"] == "Suspended" and h["message"].startswith(
            "Suspended: suspended by runPolicy.suspend"
        )
        objs[0]["spec"]["runPolicy"] = {"suspend": False}
        path.write_text(yaml.safe_dump_all(objs))
        server_side_apply(cluster, namespace, path)
        wait_phase(cluster, namespace, "drift-job", "Running")

        (pod,) = [
            p
            for p in pods(cluster, namespace, "kubetune.io/finetunejob=drift-job")
            if p["status"].get("phase") == "Running"
        ]
        finish_pod(cluster.api_client(), namespace, pod["metadata"]["name"], 0)
        wait_phase(cluster, namespace, "drift-job", "Succeeded")
        h = health(cluster, namespace, "FineTuneJob", "drift-job")
        assert h["status"] == "Healthy" and h["message"].startswith(
            "Completed: adapter written to s3://checkpoints/runs/"
        )
        time.sleep(3)
        assert_no_drift(cluster, namespace, path, objs)
    finally:
        op.stop()


def test_a_failed_job_is_degraded_for_argocd(cluster: ControlPlane, namespace: str, tmp_path: Path) -> None:
    install_crds(cluster)
    make_s3_secret(cluster, namespace)
    job = finetunejob(
        "bad-data",
        pod_labels={"kwok.kubetune.io/outcome": "fail"},
        pod_annotations={"kwok.kubetune.io/exit-code": "3"},
    )
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(job), namespace=namespace)
    op = OperatorProcess(cluster.kubeconfig, tmp_path, namespaces=[namespace], resync_seconds=5).start()
    try:
        wait_phase(cluster, namespace, "bad-data", "Failed")
    finally:
        op.stop()
    h = health(cluster, namespace, "FineTuneJob", "bad-data")
    assert h["status"] == "Degraded"
    assert h["message"].startswith("InvalidData: pod bad-data-1-") and "exited with code 3" in h["message"]
