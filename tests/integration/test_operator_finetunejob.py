"""The operator reconciling FineTuneJobs on the real control plane (kwok nodes play the kubelets)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.conftest import eventually
from tests.integration.operator_support import (
    HOLD,
    apply,
    finetunejob,
    finish_pod,
    get,
    make_s3_secret,
    pods,
    running_operator,
    status,
    wait_phase,
)
from tests.testground.cluster import ControlPlane
from tests.testground.operator import OperatorProcess

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with running_operator(cluster, tmp_path_factory.mktemp("operator"), resync_seconds=5) as op:
        yield op


@pytest.fixture
def ns(cluster: ControlPlane, namespace: str, operator: OperatorProcess) -> str:
    make_s3_secret(cluster, namespace)
    return namespace


def job_pods(cluster: ControlPlane, ns: str, name: str, attempt: int = 1) -> list[dict]:
    return pods(cluster, ns, f"kubetune.io/finetunejob={name},kubetune.io/attempt={attempt}")


def running_pods(cluster: ControlPlane, ns: str, name: str, n: int, attempt: int = 1) -> list[dict]:
    def check():
        ps = [p for p in job_pods(cluster, ns, name, attempt) if p["status"].get("phase") == "Running"]
        return ps if len(ps) >= n else None

    return eventually(check, timeout=60, what=f"{n} running pod(s) of {name} attempt {attempt}")


def test_children_are_created_owned_and_the_job_runs(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("basic", pod_labels=HOLD))
    running_pods(cluster, ns, "basic", 1)
    st = wait_phase(cluster, ns, "basic", "Running")
    ftj = get(cluster, ns, "finetunejob", "basic")
    assert ftj is not None
    uid = ftj["metadata"]["uid"]
    assert st["observedGeneration"] == ftj["metadata"]["generation"]
    assert st["attempt"] == 1 and st["startTime"]
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and running["observedGeneration"] == ftj["metadata"]["generation"]
    for kind, name in [
        ("serviceaccount", "basic-trainer"),
        ("role", "basic-trainer"),
        ("rolebinding", "basic-trainer"),
        ("configmap", "basic-config"),
        ("service", "basic-workers"),
        ("job", "basic-1"),
    ]:
        child = get(cluster, ns, kind, name)
        assert child is not None, f"{kind}/{name} missing"
        assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [uid], kind
    job = get(cluster, ns, "job", "basic-1")
    assert job is not None
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 1
    cfg = get(cluster, ns, "configmap", "basic-config")
    assert cfg is not None and "storage_uri: s3://checkpoints/runs" in cfg["data"]["config.yaml"]
    # The operator leaves no trace of kopf in the object: no finalizers, no annotations, spec untouched.
    assert not ftj["metadata"].get("finalizers")
    assert not any("kopf" in k for k in (ftj["metadata"].get("annotations") or {}))


def test_success_reports_the_trainers_output(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("ok", pod_labels=HOLD))
    [pod] = running_pods(cluster, ns, "ok", 1)
    wait_phase(cluster, ns, "ok", "Running")  # else a quick finish may skip Running (and its Event)
    report = {
        "adapterUri": "s3://checkpoints/runs/x/ok/uid/final/",
        "method": "lora",
        "rank": 24,
        "trainableParameters": 1234,
        "totalParameters": 99999,
        "metrics": {"eval_loss": 1.5, "exact_match": 0.75},
        "augmentation": {"replace_synonyms": {"generated": 20, "kept": 18, "dropped": 2}},
    }
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0, json.dumps(report))
    st = wait_phase(cluster, ns, "ok", "Succeeded")
    assert st["output"]["adapterUri"] == report["adapterUri"]
    assert st["output"]["trainableParameters"] == 1234
    assert (st["output"]["method"], st["output"]["rank"]) == ("lora", 24)  # as trained, not the spec's r 8
    assert st["output"]["augmentation"] == {"replace_synonyms": {"generated": 20, "kept": 18, "dropped": 2}}
    assert st["metrics"] == {"eval_loss": 1.5, "exact_match": 0.75}
    assert st["completionTime"]
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "ok"}
    assert {"Running", "Succeeded"} <= reasons


def hide_from_operator(cluster: ControlPlane, ns: str, pod: str) -> None:
    """Take a pod off the operator's watch (which selects on the managed-by label), as if its
    events were late: the Job controller (which selects on controller-uid) still counts it."""
    cluster.kubectl("label", "pod", pod, "app.kubernetes.io/managed-by-", namespace=ns)


def test_success_waits_for_the_trainers_report_when_the_job_finishes_first(
    cluster: ControlPlane, ns: str
) -> None:
    apply(cluster, ns, finetunejob("late-pod", pod_labels=HOLD))
    [pod] = running_pods(cluster, ns, "late-pod", 1)
    wait_phase(cluster, ns, "late-pod", "Running")
    name = pod["metadata"]["name"]
    hide_from_operator(cluster, ns, name)
    wait_phase(cluster, ns, "late-pod", "Pending")  # the operator no longer sees the pod
    report = {"adapterUri": "s3://x/final/", "trainableParameters": 321, "totalParameters": 4321}
    finish_pod(cluster.api_client(), ns, name, 0, json.dumps(report))
    eventually(
        lambda: observe_complete(cluster, ns, "late-pod-1"), timeout=30, what="Job late-pod-1 Complete"
    )
    st = wait_phase(cluster, ns, "late-pod", "Succeeded", timeout=30)
    # Decided from the pod read back from the API server, not from the Job alone.
    assert st["output"] == report


def observe_complete(cluster: ControlPlane, ns: str, job: str) -> bool:
    j = get(cluster, ns, "job", job) or {}
    return any(
        c["type"] == "Complete" and c["status"] == "True"
        for c in (j.get("status") or {}).get("conditions") or []
    )


def test_a_bad_config_is_not_retried_when_the_job_fails_before_the_pod_is_seen(
    cluster: ControlPlane, ns: str
) -> None:
    apply(cluster, ns, finetunejob("late-fail", pod_labels=HOLD, runPolicy={"maxRestarts": 3}))
    [pod] = running_pods(cluster, ns, "late-fail", 1)
    name = pod["metadata"]["name"]
    hide_from_operator(cluster, ns, name)
    finish_pod(cluster.api_client(), ns, name, 2, "spec.hyperparameters.learningRate: must be > 0")
    st = wait_phase(cluster, ns, "late-fail", "Failed", timeout=30)
    assert st["attempt"] == 1
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfig" and "not retried" in failed["message"]
    assert "learningRate" in failed["message"]
    assert get(cluster, ns, "job", "late-fail-2") is None
    # The Job itself records it too (podFailurePolicy FailJob on the exit codes 2, 3, 4).
    job = get(cluster, ns, "job", "late-fail-1") or {}
    conds = {c["type"]: c for c in job["status"]["conditions"]}
    assert conds["Failed"]["reason"] == "PodFailurePolicy" and "exit code 2" in conds["Failed"]["message"]


def test_two_nodes_by_eight_gpus_land_on_both_gpu_nodes(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("big", nodes=2, gpus=8, pod_labels=HOLD))
    ps = running_pods(cluster, ns, "big", 2)
    assert sorted(p["spec"]["nodeName"] for p in ps) == ["gpu-node-0", "gpu-node-1"]
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in ps)
    assert indexes == ["0", "1"]
    cmd = ps[0]["spec"]["containers"][0]["command"]
    assert "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
    assert f"--master-addr=big-1-0.big-workers.{ns}.svc" in cmd
    st = wait_phase(cluster, ns, "big", "Running")
    assert next(c for c in st["conditions"] if c["type"] == "Running")["message"].startswith("2 of 2 workers")
    for p in ps:  # free the GPUs for the other tests
        finish_pod(cluster.api_client(), ns, p["metadata"]["name"], 0)
    wait_phase(cluster, ns, "big", "Succeeded")


def test_failed_attempt_restarts_then_fails_with_the_pod_and_exit_code(
    cluster: ControlPlane, ns: str
) -> None:
    apply(
        cluster,
        ns,
        finetunejob(
            "flaky",
            pod_labels={"kwok.kubetune.io/outcome": "fail"},
            pod_annotations={"kwok.kubetune.io/exit-code": "1"},
            runPolicy={"maxRestarts": 1},
        ),
    )
    st = wait_phase(cluster, ns, "flaky", "Failed", timeout=90)
    assert st["attempt"] == 2
    assert get(cluster, ns, "job", "flaky-1") is not None and get(cluster, ns, "job", "flaky-2") is not None
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainerFailed"
    assert "flaky-2-0" in failed["message"] and "exited with code 1" in failed["message"]
    assert "maxRestarts=1" in failed["message"]
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert any(e["reason"] == "Restarting" for e in events if e["involvedObject"].get("name") == "flaky")


def test_configuration_errors_are_not_retried(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        finetunejob(
            "badcfg",
            pod_labels={"kwok.kubetune.io/outcome": "fail"},
            pod_annotations={"kwok.kubetune.io/exit-code": "3"},
            runPolicy={"maxRestarts": 3},
        ),
    )
    st = wait_phase(cluster, ns, "badcfg", "Failed")
    assert st["attempt"] == 1
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidData" and "not retried" in failed["message"]
    assert get(cluster, ns, "job", "badcfg-2") is None
    job = get(cluster, ns, "job", "badcfg-1") or {}
    assert (
        next(c for c in job["status"]["conditions"] if c["type"] == "Failed")["reason"] == "PodFailurePolicy"
    )


def test_suspend_and_resume(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("pausable", pod_labels=HOLD, runPolicy={"suspend": True}))
    st = wait_phase(cluster, ns, "pausable", "Suspended")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"
    job = get(cluster, ns, "job", "pausable-1")
    assert job is not None and job["spec"]["suspend"] is True
    time.sleep(1)
    assert not job_pods(cluster, ns, "pausable")
    cluster.kubectl(
        "patch",
        "finetunejob",
        "pausable",
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":false}}}',
        namespace=ns,
    )
    running_pods(cluster, ns, "pausable", 1)
    st = wait_phase(cluster, ns, "pausable", "Running")
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "False"
    # Suspending a running job stops its pods (the trainer checkpoints on SIGTERM) and keeps the attempt.
    cluster.kubectl(
        "patch",
        "finetunejob",
        "pausable",
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":true}}}',
        namespace=ns,
    )
    st = wait_phase(cluster, ns, "pausable", "Suspended")
    assert st["attempt"] == 1
    eventually(
        lambda: not job_pods(cluster, ns, "pausable"), timeout=30, what="pods to go away when suspended"
    )


def test_kueue_queue_creates_the_job_suspended_until_admitted(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("queued", pod_labels=HOLD, runPolicy={"queueName": "gpu-queue"}))
    st = wait_phase(cluster, ns, "queued", "Queued")
    assert "gpu-queue" in next(c for c in st["conditions"] if c["type"] == "Suspended")["message"]
    job = get(cluster, ns, "job", "queued-1")
    assert job is not None
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    # Play Kueue: admit the workload by unsuspending the Job.
    cluster.kubectl(
        "patch", "job", "queued-1", "--type=merge", "-p", '{"spec":{"suspend":false}}', namespace=ns
    )
    running_pods(cluster, ns, "queued", 1)
    wait_phase(cluster, ns, "queued", "Running")
    assert (
        get(cluster, ns, "job", "queued-1")["spec"]["suspend"] is False
    )  # the operator did not re-suspend it


def test_unschedulable_pods_show_in_status(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("huge", gpus=16, pod_labels=HOLD))

    def cond():
        st = status(cluster, ns, "huge")
        c = next((c for c in st.get("conditions") or [] if c["type"] == "PodsScheduled"), None)
        return c if c and c["status"] == "False" else None

    c = eventually(cond, timeout=60, what="PodsScheduled=False")
    assert c["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in c["message"]
    assert status(cluster, ns, "huge")["phase"] == "Pending"


def test_deleting_the_finetunejob_garbage_collects_its_children(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("doomed", pod_labels=HOLD))
    running_pods(cluster, ns, "doomed", 1)
    cluster.kubectl("delete", "finetunejob", "doomed", "--wait=true", "--timeout=30s", namespace=ns)
    for kind, name in [
        ("job", "doomed-1"),
        ("configmap", "doomed-config"),
        ("serviceaccount", "doomed-trainer"),
    ]:
        eventually(
            lambda k=kind, n=name: get(cluster, ns, k, n) is None,
            timeout=60,
            what=f"{kind}/{name} to be collected",
        )
    eventually(lambda: not job_pods(cluster, ns, "doomed"), timeout=60, what="pods to be collected")


def test_ttl_after_finished_deletes_the_job(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("short-lived", pod_labels=HOLD, runPolicy={"ttlSecondsAfterFinished": 6}))
    [pod] = running_pods(cluster, ns, "short-lived", 1)
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0)
    wait_phase(cluster, ns, "short-lived", "Succeeded")  # up for the TTL's 6 s: a busy machine cannot miss it
    eventually(
        lambda: get(cluster, ns, "finetunejob", "short-lived") is None, timeout=60, what="TTL deletion"
    )


def test_active_deadline_fails_the_job(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("slow", pod_labels=HOLD, runPolicy={"activeDeadlineSeconds": 3}))
    st = wait_phase(cluster, ns, "slow", "Failed", timeout=60)
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"


def _token_client(cluster: ControlPlane, ns: str, sa: str) -> client.CustomObjectsApi:
    api = cluster.api_client()
    token = client.CoreV1Api(api).create_namespaced_service_account_token(sa, ns, {"spec": {}}).status.token
    cfg = client.Configuration()
    cfg.host = cluster.server
    cfg.ssl_ca_cert = api.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.CustomObjectsApi(client.ApiClient(cfg))


def test_trainer_service_account_can_patch_only_its_own_status(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("mine", pod_labels=HOLD))
    apply(cluster, ns, finetunejob("theirs", pod_labels=HOLD))
    running_pods(cluster, ns, "mine", 1)
    as_trainer = _token_client(cluster, ns, "mine-trainer")
    progress = {"status": {"progress": {"step": 5, "totalSteps": 10, "percent": 50.0}}}

    def patch_own():
        try:
            as_trainer.patch_namespaced_custom_object_status(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", "mine", progress
            )
            return True
        except client.ApiException as e:
            if e.status == 403:
                return False  # the RoleBinding is not visible yet
            raise

    eventually(patch_own, timeout=20, what="the trainer's RoleBinding")
    assert status(cluster, ns, "mine")["progress"]["step"] == 5
    with pytest.raises(client.ApiException) as e:
        as_trainer.patch_namespaced_custom_object_status(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", "theirs", progress
        )
    assert e.value.status == 403
    with pytest.raises(client.ApiException) as e:
        as_trainer.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", "mine", {"spec": {"runPolicy": {"suspend": True}}}
        )
    assert e.value.status == 403
    with pytest.raises(client.ApiException) as e:
        as_trainer.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", "mine")
    assert e.value.status == 403


def test_operator_metrics(cluster: ControlPlane, ns: str, operator: OperatorProcess) -> None:
    apply(cluster, ns, finetunejob("measured", pod_labels=HOLD))
    wait_phase(cluster, ns, "measured", "Running")
    text = operator.metrics()
    assert 'kubetune_operator_reconciles_total{kind="FineTuneJob",result="success"}' in text
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in text
    running = [
        line for line in text.splitlines() if line.startswith('kubetune_finetunejobs{phase="Running"}')
    ]
    assert running and float(running[0].split()[-1]) >= 1
