"""ProgressReporter against a real kube-apiserver: rate-limited merge patches of a status
subresource with a ServiceAccount token, the final update on close(), RBAC failures tolerated.

The FineTuneJob CRD belongs to the operator; to keep this test independent of it (and never
replace the real CRD in the shared test cluster), a stand-in CRD with the same status fields and
a status subresource is used through ``ProgressReporter(resource=...)``. Its schema lists the
fields explicitly, so the API server would prune (drop) any field the reporter misnames.
"""

from __future__ import annotations

import logging
import time

import pytest
import yaml

from kubetune_trainer.progress import ProgressReporter

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "progress-test.kubetune.io", "v1", "progressprobes"
NUM = {"type": "number"}
INT = {"type": "integer"}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "progressprobe", "kind": "ProgressProbe"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            "status": {
                                "type": "object",
                                "properties": {
                                    "progress": {
                                        "type": "object",
                                        "properties": {
                                            "step": INT,
                                            "totalSteps": INT,
                                            "epoch": NUM,
                                            "percent": NUM,
                                            "trainLoss": NUM,
                                            "evalLoss": NUM,
                                            "learningRate": NUM,
                                            "tokensPerSecond": NUM,
                                            "etaSeconds": INT,
                                            "updatedAt": {"type": "string", "format": "date-time"},
                                        },
                                    },
                                    "checkpoint": {
                                        "type": "object",
                                        "properties": {
                                            "latest": {"type": "string"},
                                            "step": INT,
                                            "count": INT,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def probe(cluster, namespace: str):
    from kubernetes import client

    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(CRD))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=30s")
    api = client.CustomObjectsApi(cluster.api_client())
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ProgressProbe",
        "metadata": {"name": "job1"},
        "spec": {},
    }
    deadline = time.monotonic() + 20
    while True:  # the new resource takes a moment to be served
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            break
        except client.ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    return api


def service_account_client(cluster, namespace: str, name: str, verbs: list[str]):
    """An ApiClient authenticated as a fresh ServiceAccount allowed ``verbs`` on the status."""
    from kubernetes import client

    admin = cluster.api_client()
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": verbs}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = cluster.server, admin.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def read_status(api, namespace: str) -> dict:
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "job1").get("status") or {}


def test_rate_limited_status_patches_with_a_service_account(cluster, namespace: str, probe) -> None:
    sa = service_account_client(cluster, namespace, "trainer", ["get", "patch"])
    reporter = ProgressReporter(
        job=(namespace, "job1"),
        min_patch_interval_s=1.0,
        show_bar=False,
        api_client=sa,
        resource=(GROUP, VERSION, PLURAL),
    )
    deadline = time.monotonic() + 20
    while reporter.patcher and reporter.patcher.sent == 0 and time.monotonic() < deadline:
        reporter.update(1, 100, 0.01, train_loss=4.0, learning_rate=1e-4)  # until RBAC has propagated
        time.sleep(0.2)
    assert reporter.patcher is not None and reporter.patcher.sent >= 1
    sent_before = reporter.patcher.sent
    started = time.monotonic()
    for step in range(2, 61):  # 59 updates within ~1.5 s
        reporter.update(step, 100, step / 100, train_loss=4.0 - step / 30, tokens_per_second=1000.0 + step)
        time.sleep(0.025)
    reporter.update(60, 100, 0.6, eval_loss=2.5)
    elapsed = time.monotonic() - started
    reporter.checkpoint(
        f"s3://b/x/{namespace}/job1/uid/checkpoints/checkpoint-60/", 60, 2, upload_seconds=1.0
    )
    reporter.close()

    patches = reporter.patcher.sent - sent_before
    assert 2 <= patches <= elapsed / 1.0 + 3, f"{patches} patches in {elapsed:.1f}s"
    status = read_status(probe, namespace)
    progress = status["progress"]
    assert progress["step"] == 60 and progress["totalSteps"] == 100 and progress["percent"] == 60.0
    assert progress["epoch"] == 0.6 and progress["evalLoss"] == 2.5
    assert progress["trainLoss"] == pytest.approx(4.0 - 60 / 30)
    assert progress["learningRate"] == 1e-4 and progress["tokensPerSecond"] == 1060.0
    assert isinstance(progress["etaSeconds"], int) and progress["updatedAt"].endswith("Z")
    assert status["checkpoint"] == {
        "latest": f"s3://b/x/{namespace}/job1/uid/checkpoints/checkpoint-60/",
        "step": 60,
        "count": 2,
    }


def test_kubeconfig_is_loaded_lazily_from_the_environment(
    cluster, namespace: str, probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    with ProgressReporter(
        job=(namespace, "job1"), show_bar=False, resource=(GROUP, VERSION, PLURAL)
    ) as reporter:
        reporter.update(7, 10, 0.7, train_loss=1.25)
    assert read_status(probe, namespace)["progress"]["step"] == 7


def test_forbidden_patches_are_logged_once_and_never_raise(cluster, namespace: str, probe, caplog) -> None:
    sa = service_account_client(cluster, namespace, "readonly", ["get"])
    caplog.set_level(logging.WARNING, logger="kubetune_trainer.progress")
    reporter = ProgressReporter(
        job=(namespace, "job1"),
        min_patch_interval_s=0.0,
        show_bar=False,
        api_client=sa,
        resource=(GROUP, VERSION, PLURAL),
    )
    for step in range(1, 30):
        reporter.update(step, 30, None)
        time.sleep(0.01)
    reporter.close()
    assert reporter.patcher is not None and reporter.patcher.failed >= 2 and reporter.patcher.sent == 0
    warnings = [r.getMessage() for r in caplog.records if "failed: HTTP 403" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"needs the 'patch' verb on {PLURAL}/status" in warnings[0]
    assert "Bearer" not in caplog.text and "authorization" not in caplog.text.lower()
    assert "progress" not in read_status(probe, namespace)
