"""Helpers for operator tests on the real control plane (imported by the test modules)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.conftest import eventually
from tests.testground.cluster import REPO, ControlPlane
from tests.testground.operator import OperatorProcess

CRDS = sorted((REPO / "crds").glob("*.yaml"))


# kwok keeps a pod with this label Running until the test finishes it (finish_pod).
HOLD = {"kwok.kubetune.io/outcome": "hold"}


def install_crds(cluster: ControlPlane) -> None:
    for crd in CRDS:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    for crd in ("finetunejobs.kubetune.io", "adapterdeployments.kubetune.io", "finetunesweeps.kubetune.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@contextlib.contextmanager
def running_operator(
    cluster: ControlPlane, workdir: Path, resync_seconds: float = 5
) -> Iterator[OperatorProcess]:
    """The CRDs installed and the operator running (all namespaces) until the block ends."""
    install_crds(cluster)
    op = OperatorProcess(cluster.kubeconfig, workdir, resync_seconds=resync_seconds).start()
    try:
        yield op
    finally:
        op.stop()


def finetunejob(
    name: str, *, nodes: int = 1, gpus: int = 1, pod_labels=None, pod_annotations=None, **spec
) -> dict:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama"},
            "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
            "resources": {"nodes": nodes, "gpusPerNode": gpus},
            "storage": {"uri": "s3://checkpoints/runs", "secretRef": {"name": "s3-credentials"}},
            **spec,
        },
    }
    if pod_labels or pod_annotations:
        body["spec"]["podMetadata"] = {"labels": pod_labels or {}, "annotations": pod_annotations or {}}
    return body


def apply(cluster: ControlPlane, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), namespace=namespace)


def get(cluster: ControlPlane, namespace: str, kind: str, name: str) -> dict | None:
    res = cluster.kubectl("get", kind, name, "-o", "json", namespace=namespace, check=False)
    if res.returncode != 0:
        if "NotFound" in res.stderr:
            return None
        raise AssertionError(res.stderr)
    return json.loads(res.stdout)


def status(cluster: ControlPlane, namespace: str, name: str) -> dict:
    obj = get(cluster, namespace, "finetunejob", name) or {}
    return obj.get("status") or {}


def wait_phase(cluster: ControlPlane, namespace: str, name: str, phase: str, timeout: float = 60) -> dict:
    def reached():
        st = status(cluster, namespace, name)
        if st.get("phase") == "Failed" and phase != "Failed":
            # Failed is terminal: stop waiting at once (not an AssertionError, which eventually() retries).
            raise RuntimeError(
                f"FineTuneJob {name} failed while waiting for {phase}: {json.dumps(st)[:3000]}"
            )
        return st if st.get("phase") == phase else None

    try:
        return eventually(reached, timeout=timeout, what=f"FineTuneJob {name} to be {phase}")
    except AssertionError as e:
        raise AssertionError(
            f"{e}; last status: {json.dumps(status(cluster, namespace, name), indent=1)}"
        ) from None


def pods(cluster: ControlPlane, namespace: str, selector: str) -> list[dict]:
    out = cluster.kubectl("get", "pods", "-l", selector, "-o", "json", namespace=namespace)
    return json.loads(out.stdout)["items"]


def finish_pod(api: client.ApiClient, namespace: str, pod: str, exit_code: int, message: str = "") -> None:
    """Play the kubelet: write a held pod's final state."""
    phase = "Succeeded" if exit_code == 0 else "Failed"
    term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
    if message:
        term["message"] = message
    client.CoreV1Api(api).patch_namespaced_pod_status(
        pod,
        namespace,
        {
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "kubetune/trainer:test",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": term},
                    }
                ],
            }
        },
    )


def make_s3_secret(cluster: ControlPlane, namespace: str, name: str = "s3-credentials") -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "--from-literal=AWS_ACCESS_KEY_ID=test-access-key",
        "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret-key",
        namespace=namespace,
    )


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def rbac_denials(log: str) -> list[str]:
    """Log entries where the API server refused the operator (403), other than writes into a
    namespace being deleted (NamespaceTerminating: a 403 that says nothing about RBAC, which a
    cluster-wide operator meets when earlier tests' namespaces go away)."""
    entries = re.split(r"\n(?=\[\d{4}-\d\d-\d\d )", log)
    # The timestamp's milliseconds can be 403 too: look at what follows it.
    bodies = [(e, re.sub(r"^\[[^\]]*\]", "", e)) for e in entries]
    return [e for e, b in bodies if ("403" in b or "Forbidden" in b) and "NamespaceTerminating" not in b]
