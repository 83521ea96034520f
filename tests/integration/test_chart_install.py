"""`helm install` of charts/kubetune into the real control plane, in namespaced mode.

test_operator_robustness.py runs the operator with the chart's ClusterRole; this runs it with
the other RBAC mode: `operator.watchNamespaces`, a Role and RoleBinding per namespace and no
cluster-wide permission at all. The operator process runs here (kwok has no kubelet to run
the image), with a token of the ServiceAccount that `helm install` created.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import eventually
from tests.integration.operator_support import (
    HOLD,
    apply,
    finetunejob,
    finish_pod,
    install_crds,
    make_s3_secret,
    pods,
    rbac_denials,
    wait_phase,
)
from tests.integration.test_operator_robustness import token_kubeconfig
from tests.testground.cluster import REPO, ControlPlane, binaries_dir
from tests.testground.operator import OperatorProcess

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "kubetune"


def helm(cluster: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(binaries_dir() / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture
def release_ns(cluster: ControlPlane):
    name = f"kubetune-system-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.slow
def test_helm_install_namespaced_mode_and_the_operator_runs_with_only_its_roles(
    cluster: ControlPlane, namespace: str, release_ns: str, tmp_path: Path
) -> None:
    install_crds(cluster)  # as another test may have; helm then keeps the existing CRDs
    make_s3_secret(cluster, namespace)
    res = helm(
        cluster,
        "install",
        "kt",
        str(CHART),
        "--namespace",
        release_ns,
        "--set",
        f"operator.watchNamespaces={{{namespace}}}",
        "--wait",
        "--timeout",
        "90s",
    )
    assert f"The operator watches: {namespace}" in res.stdout  # NOTES.txt
    # The Deployment rolled out (kwok runs its pod), and no cluster-wide RBAC came with it.
    dep = json.loads(
        cluster.kubectl("get", "deploy", "kt-kubetune", "-o", "json", namespace=release_ns).stdout
    )
    assert dep["status"].get("availableReplicas") == 1
    crbs = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/instance=kt", "-o", "name"
    )
    assert crbs.stdout.strip() == ""
    assert cluster.kubectl("get", "role", "kt-kubetune", namespace=namespace).returncode == 0

    kubeconfig = token_kubeconfig(cluster, tmp_path / "operator.kubeconfig", release_ns, "kt-kubetune")
    # Run the operator with the namespaces the installed Deployment passes it.
    [container] = dep["spec"]["template"]["spec"]["containers"]
    watched = [a.removeprefix("--namespace=") for a in container["args"] if a.startswith("--namespace=")]
    assert watched == [namespace]
    op = OperatorProcess(kubeconfig, tmp_path, namespaces=watched, resync_seconds=5).start()
    try:
        apply(cluster, namespace, finetunejob("scoped", pod_labels=HOLD))
        wait_phase(cluster, namespace, "scoped", "Running")
        apply(
            cluster,
            namespace,
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "AdapterDeployment",
                "metadata": {"name": "scoped-serve"},
                "spec": {
                    "baseModel": {"uri": "s3://models/tiny-llama"},
                    "adapters": [{"name": "scoped", "fineTuneJobRef": {"name": "scoped"}}],
                    "storage": {"secretRef": {"name": "s3-credentials"}},
                },
            },
        )
        (pod,) = pods(cluster, namespace, "kubetune.io/finetunejob=scoped")
        finish_pod(cluster.api_client(), namespace, pod["metadata"]["name"], 0)
        wait_phase(cluster, namespace, "scoped", "Succeeded")

        def ready():
            out = cluster.kubectl(
                "get", "adep", "scoped-serve", "-o", "jsonpath={.status.phase}", namespace=namespace
            )
            return out.stdout == "Ready"

        eventually(ready, timeout=60, what="AdapterDeployment scoped-serve to be Ready")
        # A FineTuneSweep: the operator creates its trial FineTuneJob (ownerReference with
        # blockOwnerDeletion) and writes the sweep's status with only the chart's Role.
        template = finetunejob("t", pod_labels=HOLD)["spec"]
        template["dataset"]["validationSplit"] = 0.1
        sweep = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": "scoped-sweep"},
            "spec": {"template": template, "parameters": [{"path": "method.lora.r", "values": [8]}]},
        }
        apply(cluster, namespace, sweep)
        wait_phase(cluster, namespace, "scoped-sweep-0", "Running")
        (pod,) = pods(cluster, namespace, "kubetune.io/finetunejob=scoped-sweep-0")
        finish_pod(
            cluster.api_client(), namespace, pod["metadata"]["name"], 0, '{"metrics": {"eval_loss": 1.0}}'
        )

        def swept():
            out = cluster.kubectl(
                "get", "fts", "scoped-sweep", "-o", "jsonpath={.status.phase}", namespace=namespace
            )
            return out.stdout == "Succeeded"

        eventually(swept, timeout=60, what="FineTuneSweep scoped-sweep to succeed")
        log = op.log_text()
        denied = rbac_denials(log)
        assert not denied, "\n".join(denied)[-3000:]
    finally:
        op.stop()
    # The token has no reach outside the watched namespace.
    other = cluster.kubectl("--kubeconfig", str(kubeconfig), "get", "finetunejobs", "-A", check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()

    # Upgrade with a changed value, then uninstall: CRDs stay (Helm never deletes crds/).
    helm(
        cluster,
        "upgrade",
        "kt",
        str(CHART),
        "--namespace",
        release_ns,
        "--reuse-values",
        "--set",
        "operator.resyncSeconds=30",
    )
    dep = json.loads(
        cluster.kubectl("get", "deploy", "kt-kubetune", "-o", "json", namespace=release_ns).stdout
    )
    assert "--resync-seconds=30" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    helm(cluster, "uninstall", "kt", "--namespace", release_ns, "--wait")
    assert cluster.kubectl("get", "role", "kt-kubetune", namespace=namespace, check=False).returncode != 0
    assert cluster.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0


def test_helm_template_renders_the_chart_offline() -> None:
    """`helm template` (no cluster) checks kubeVersion against the version helm was built for: a
    helm built without its version ldflags says v1.20 and refuses the chart (>= 1.30)."""
    res = subprocess.run(
        [str(binaries_dir() / "helm"), "template", "kt", str(CHART)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(res.stdout) if doc}
    assert {"Deployment", "ServiceAccount", "ClusterRole"} <= kinds
