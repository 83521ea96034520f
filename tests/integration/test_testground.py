"""Smoke tests that prove the test ground is the real thing: scheduling, Jobs, GC, CEL, RBAC, S3."""

from __future__ import annotations

import json
import textwrap

import boto3
import pytest
from botocore.exceptions import ClientError
from kubernetes import client

from tests.conftest import eventually
from tests.testground.cluster import ControlPlane, node
from tests.testground.procs import TestgroundError

pytestmark = pytest.mark.cluster

BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.36.1-1"


def job_manifest(name: str, gpus: int, labels: dict[str, str] | None = None, annotations=None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels or {}, "annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": BUSYBOX,
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},
                        }
                    ],
                },
            },
        },
    }


def pod_manifest(name: str, gpus: int = 0, labels=None, annotations=None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX,
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},
                }
            ],
        },
    }


def apply(cluster: ControlPlane, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), namespace=namespace)


def get(cluster: ControlPlane, namespace: str, kind: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", kind, name, "-o", "json", namespace=namespace).stdout)


def test_real_kubernetes_version(cluster: ControlPlane) -> None:
    version = client.VersionApi(cluster.api_client()).get_code()
    assert version.major == "1"
    assert int(version.minor.rstrip("+")) >= 33, version.git_version


def test_nodes_advertise_gpus(cluster: ControlPlane) -> None:
    nodes = client.CoreV1Api(cluster.api_client()).list_node().items
    gpu = {n.metadata.name: n for n in nodes if "nvidia.com/gpu" in (n.status.allocatable or {})}
    assert sorted(gpu) == ["gpu-node-0", "gpu-node-1"]
    for n in gpu.values():
        assert n.status.allocatable["nvidia.com/gpu"] == "8"
        assert n.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert any(n.metadata.name == "cpu-node-0" for n in nodes)


def test_gpu_job_is_scheduled_on_a_gpu_node_and_succeeds(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, namespace, job_manifest("two-gpus", gpus=2))

    def complete():
        job = get(cluster, namespace, "job", "two-gpus")
        return any(
            c["type"] == "Complete" and c["status"] == "True" for c in job["status"].get("conditions", [])
        )

    eventually(complete, timeout=60, what="the Job to complete")
    pods = json.loads(
        cluster.kubectl("get", "pods", "-l", "job-name=two-gpus", "-o", "json", namespace=namespace).stdout
    )
    [pod] = pods["items"]
    assert pod["spec"]["nodeName"].startswith("gpu-node-")
    assert pod["status"]["phase"] == "Succeeded"


def test_sixteen_gpus_stay_pending_unschedulable(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, namespace, pod_manifest("too-big", gpus=16))

    def unschedulable():
        pod = get(cluster, namespace, "pod", "too-big")
        conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
        sched = conds.get("PodScheduled")
        return pod["status"]["phase"] == "Pending" and sched and sched["reason"] == "Unschedulable" and sched

    cond = eventually(unschedulable, timeout=30, what="PodScheduled=False/Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert not get(cluster, namespace, "pod", "too-big")["spec"].get("nodeName")


def test_pod_marked_to_fail_ends_failed_with_the_chosen_exit_code(
    cluster: ControlPlane, namespace: str
) -> None:
    apply(
        cluster,
        namespace,
        pod_manifest(
            "doomed",
            labels={"kwok.kubetune.io/outcome": "fail"},
            annotations={"kwok.kubetune.io/exit-code": "42"},
        ),
    )

    def failed():
        pod = get(cluster, namespace, "pod", "doomed")
        return pod["status"]["phase"] == "Failed" and pod

    pod = eventually(failed, timeout=30, what="the pod to fail")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 42


def test_held_pod_stays_running_until_the_test_finishes_it(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, namespace, job_manifest("held", gpus=1, labels={"kwok.kubetune.io/outcome": "hold"}))
    core = client.CoreV1Api(cluster.api_client())

    def running_pod():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=held").items
        return pods and pods[0].status.phase == "Running" and pods[0]

    pod = eventually(running_pod, timeout=30, what="the held pod to run")
    # Well past the default 1s run duration it is still running: nothing but the test ends it.
    import time

    time.sleep(3)
    assert core.read_namespaced_pod(pod.metadata.name, namespace).status.phase == "Running"
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        namespace,
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": BUSYBOX,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": 7, "reason": "Error"}},
                    }
                ],
            }
        },
    )

    def job_failed():
        job = get(cluster, namespace, "job", "held")
        return any(
            c["type"] == "Failed" and c["status"] == "True" for c in job["status"].get("conditions", [])
        )

    eventually(job_failed, timeout=30, what="the Job controller to see the failure the test wrote")


def test_deleting_a_job_garbage_collects_its_pods(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, namespace, job_manifest("gc-me", gpus=1, labels={"kwok.kubetune.io/outcome": "hold"}))
    core = client.CoreV1Api(cluster.api_client())
    eventually(
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=gc-me").items,
        timeout=30,
        what="the Job's pod",
    )
    # Background propagation: the Job goes at once, the garbage collector removes the pods.
    cluster.kubectl("delete", "job", "gc-me", "--cascade=background", "--wait=false", namespace=namespace)
    eventually(
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=gc-me").items,
        timeout=60,
        what="the garbage collector to delete the Job's pods",
    )


CEL_CRD = textwrap.dedent(
    """
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.smoke.kubetune.io
    spec:
      group: smoke.kubetune.io
      names: {kind: Widget, plural: widgets, singular: widget}
      scope: Namespaced
      versions:
      - name: v1
        served: true
        storage: true
        schema:
          openAPIV3Schema:
            type: object
            properties:
              spec:
                type: object
                x-kubernetes-validations:
                - rule: "self.min <= self.max"
                  message: "spec.min must not exceed spec.max; lower min or raise max"
                properties:
                  min: {type: integer}
                  max: {type: integer}
    """
)


def test_crd_cel_rule_rejects_a_bad_object_with_its_message(cluster: ControlPlane, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=CEL_CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.kubetune.io", "--timeout=30s")
    good = {
        "apiVersion": "smoke.kubetune.io/v1",
        "kind": "Widget",
        "metadata": {"name": "ok"},
        "spec": {"min": 1, "max": 2},
    }
    bad = {**good, "metadata": {"name": "bad"}, "spec": {"min": 5, "max": 2}}

    def accepted():
        return (
            cluster.kubectl(
                "apply", "-f", "-", input=json.dumps(good), namespace=namespace, check=False
            ).returncode
            == 0
        )

    eventually(accepted, timeout=20, what="the new CRD to be served")
    res = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), namespace=namespace, check=False)
    assert res.returncode != 0
    assert "spec.min must not exceed spec.max; lower min or raise max" in res.stderr


def test_rbac_is_enforced_for_a_serviceaccount_token(cluster: ControlPlane, namespace: str) -> None:
    api = cluster.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token

    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = api.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    as_sa = client.CoreV1Api(client.ApiClient(cfg))

    def can_list() -> bool:
        as_sa.list_namespaced_pod(namespace)
        return True

    eventually(lambda: _allowed(can_list), timeout=20, what="the RoleBinding to take effect")
    with pytest.raises(client.ApiException) as e:
        as_sa.list_namespaced_secret(namespace)
    assert e.value.status == 403
    with pytest.raises(client.ApiException) as e:
        as_sa.list_namespaced_pod("default")
    assert e.value.status == 403
    bad = client.Configuration()
    bad.host, bad.ssl_ca_cert = cluster.server, cfg.ssl_ca_cert
    bad.api_key = {"authorization": "Bearer not-a-token"}
    with pytest.raises(client.ApiException) as e:
        client.CoreV1Api(client.ApiClient(bad)).list_namespaced_pod(namespace)
    assert e.value.status == 401


def _allowed(fn) -> bool:
    try:
        return fn()
    except client.ApiException as e:
        if e.status == 403:
            return False
        raise


@pytest.mark.s3
def test_boto3_round_trips_an_object_through_seaweedfs(s3, s3_bucket: str) -> None:
    c = s3.client()
    body = bytes(range(256)) * 4096  # 1 MiB
    c.put_object(Bucket=s3_bucket, Key="a/b/blob.bin", Body=body)
    assert c.get_object(Bucket=s3_bucket, Key="a/b/blob.bin")["Body"].read() == body
    listed = c.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/b/blob.bin"]
    wrong = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key="wrong-secret",
        region_name=s3.region,
    )
    with pytest.raises(ClientError) as e:
        wrong.get_object(Bucket=s3_bucket, Key="a/b/blob.bin")
    assert e.value.response["Error"]["Code"] in {
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidAccessKeyId",
    }


def test_missing_binaries_fail_with_a_clear_error(tmp_path) -> None:
    cp = ControlPlane(tmp_path / "cp", bin_dir=tmp_path / "nowhere", nodes=[node("n", cpu="1", memory="1Gi")])
    with pytest.raises(TestgroundError, match="make binaries"):
        cp.start()
