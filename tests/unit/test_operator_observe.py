"""Reading an attempt's outcome from its Job and pods, and waiting for the pods (no cluster)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from kubetune_operator import controller, meta
from kubetune_operator.controller import Store
from kubetune_operator.finetunejob import observe
from kubetune_operator.finetunejob import reconcile as ftj_reconcile

NS, NAME = "team-a", "llama"


FINISHED_AT = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def job(cond: str | None, reason: str = "", message: str = "") -> dict[str, Any]:
    conditions = (
        [
            {
                "type": cond,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": "2026-01-01T12:00:00Z",
            }
        ]
        if cond
        else []
    )
    return {
        "metadata": {
            "name": f"{NAME}-1",
            "namespace": NS,
            "uid": "job-uid",
            "labels": {meta.LABEL_FINETUNEJOB: NAME, meta.LABEL_ATTEMPT: "1"},
        },
        "spec": {},
        "status": {"conditions": conditions},
    }


def pod(phase: str, exit_code: int | None = None, message: str = "", index: int = 0) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "reason": "Error"}}
    return {
        "metadata": {
            "name": f"{NAME}-1-{index}-abcde",
            "namespace": NS,
            "labels": {meta.LABEL_FINETUNEJOB: NAME, meta.LABEL_ATTEMPT: "1"},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"nodeName": "gpu-node-0"},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


POLICY_MSG = "Container trainer for pod team-a/llama-1-0-abcde failed with exit code 3 matching FailJob rule at index 0"


def test_the_jobs_pod_failure_policy_reason_is_not_retried_even_without_the_pod() -> None:
    f = observe.failure(job("Failed", "PodFailurePolicy", POLICY_MSG), [])
    assert not f.retryable
    assert f.reason == "InvalidData" and f.exit_code == 3 and f.pod == "llama-1-0-abcde"


def test_an_unreadable_pod_failure_policy_message_is_still_not_retried() -> None:
    f = observe.failure(job("Failed", "PodFailurePolicy", "something else"), [])
    assert not f.retryable and f.reason == "PodFailurePolicy"


def test_backoff_limit_without_pods_stays_retryable() -> None:
    assert observe.failure(
        job("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit"), []
    ).retryable


@pytest.mark.parametrize(
    ("j", "pods", "visible"),
    [
        (job("Complete"), [], False),
        (job("Complete"), [pod("Running")], False),
        (job("Complete"), [pod("Succeeded", 0)], True),
        (job("Complete"), [pod("Succeeded", 0, index=1)], False),  # the report comes from rank 0
        (job("Failed", "BackoffLimitExceeded"), [pod("Running")], False),
        (job("Failed", "BackoffLimitExceeded"), [pod("Failed", 1)], True),
        (job("Failed", "DeadlineExceeded"), [], True),
        (job(None), [], True),
    ],
)
def test_outcome_visible(j: dict, pods: list[dict], visible: bool) -> None:
    assert observe.outcome_visible(j, pods) is visible


def test_the_slim_cache_keeps_what_the_outcome_is_read_from() -> None:
    full = pod("Failed", 3, "data.jsonl line 7: no field 'text'")
    full["metadata"]["managedFields"] = [{"manager": "kubelet"}]
    full["status"]["containerStatuses"][0].update(image="x", imageID="y", ready=False, restartCount=0)
    full["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-01T00:00:00Z"
    s = controller.slim("Pod", full)
    assert "managedFields" not in s["metadata"]
    term = s["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["message"] == "data.jsonl line 7: no field 'text'"
    f = observe.failure(job("Failed", "PodFailurePolicy", POLICY_MSG), [s])
    assert f.reason == "InvalidData" and "line 7" in f.message
    report = {"adapterUri": "s3://b/final/", "trainableParameters": 5}
    assert observe.trainer_report([controller.slim("Pod", pod("Succeeded", 0, json.dumps(report)))]) == report


class FakeKube:
    """Records the reconcile's writes; `list` answers with the pods the API server would."""

    def __init__(self, live_pods: list[dict]) -> None:
        self.live_pods = live_pods
        self.lists: list[tuple] = []
        self.status_patches: list[dict] = []

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str | None = None
    ) -> list[dict]:
        self.lists.append((kind, namespace, label_selector))
        return self.live_pods

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict) -> None:
        self.status_patches.append(status)

    def merge_patch(self, *a: Any) -> None:
        raise AssertionError(f"unexpected patch {a}")

    def post_event(self, *a: Any) -> None:
        pass


def _ftj(spec: dict, status: dict) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": NAME, "namespace": NS, "uid": "ftj-uid", "generation": 1},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny"},
            "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
            **spec,
        },
        "status": status,
    }


def _store(j: dict, pods: list[dict]) -> Store:
    store = Store()
    spec = {
        "resources": {"nodes": 1, "gpusPerNode": 1},
        "storage": {"uri": "s3://ckpt/runs"},
        "runPolicy": {"maxRestarts": 3},
    }
    store.set_parent("ADDED", _ftj(spec, {"phase": "Running", "attempt": 1}))
    store.set_child("Job", (NS, NAME), "ADDED", j)
    for p in pods:
        store.set_child("Pod", (NS, NAME), "ADDED", p)
    return store


def test_a_finished_job_waits_for_its_pods_then_reads_them_from_the_api_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [FINISHED_AT + dt.timedelta(seconds=1)]  # the Job finished a second ago
    monkeypatch.setattr(ftj_reconcile, "_utcnow", lambda: clock[0])
    report = {"adapterUri": "s3://ckpt/final/", "trainableParameters": 7, "totalParameters": 70}
    kube = FakeKube([pod("Succeeded", 0, json.dumps(report))])
    store = _store(job("Complete"), [pod("Running")])  # the pod's last event is not in yet
    key = (NS, NAME)

    r = ftj_reconcile.reconcile(kube, store, key)  # type: ignore[arg-type]
    assert r.requeue_after == ftj_reconcile.SETTLE_REQUEUE and not kube.lists
    assert all(p.get("phase") != "Succeeded" for p in kube.status_patches)

    clock[0] += dt.timedelta(seconds=ftj_reconcile.SETTLE_SECONDS - 1.1)
    assert ftj_reconcile.reconcile(kube, store, key).requeue_after == ftj_reconcile.SETTLE_REQUEUE  # type: ignore[arg-type]
    assert not kube.lists

    clock[0] += dt.timedelta(seconds=0.2)
    ftj_reconcile.reconcile(kube, store, key)  # type: ignore[arg-type]
    assert kube.lists == [("Pod", NS, "batch.kubernetes.io/controller-uid=job-uid")]
    [done] = [p for p in kube.status_patches if p.get("phase") == "Succeeded"]
    assert done["output"] == report


def test_a_finished_job_whose_pod_is_seen_is_decided_at_once() -> None:
    kube = FakeKube([])
    store = _store(job("Failed", "BackoffLimitExceeded"), [pod("Failed", 2, "bad learningRate")])
    ftj_reconcile.reconcile(kube, store, (NS, NAME))  # type: ignore[arg-type]
    assert not kube.lists
    [done] = [p for p in kube.status_patches if p.get("phase") == "Failed"]
    failed = next(c for c in done["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfig" and "bad learningRate" in failed["message"]


def test_when_the_api_server_has_no_pods_either_the_job_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [FINISHED_AT]
    monkeypatch.setattr(ftj_reconcile, "_utcnow", lambda: clock[0])
    kube = FakeKube([])
    store = _store(job("Failed", "PodFailurePolicy", POLICY_MSG), [])
    assert ftj_reconcile.reconcile(kube, store, (NS, NAME)).requeue_after is not None  # type: ignore[arg-type]
    clock[0] += dt.timedelta(seconds=ftj_reconcile.SETTLE_SECONDS + 1)
    ftj_reconcile.reconcile(kube, store, (NS, NAME))  # type: ignore[arg-type]
    [done] = [p for p in kube.status_patches if p.get("phase") == "Failed"]
    assert done.get("attempt", 1) == 1
    assert next(c for c in done["conditions"] if c["type"] == "Failed")["reason"] == "InvalidData"


def test_a_worker_that_exited_before_the_job_completes_keeps_the_job_running() -> None:
    # The trainer exited 0; the Job controller has not marked the Job Complete yet.
    kube = FakeKube([])
    store = _store(job(None), [pod("Succeeded", 0, "{}")])
    ftj_reconcile.reconcile(kube, store, (NS, NAME))  # type: ignore[arg-type]
    [patch] = kube.status_patches  # only what changed: the phase stays Running
    assert patch.get("phase", "Running") == "Running"
    running = next(c for c in patch["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and "1 finished" in running["message"]


def _invalid_spec_store(status: dict) -> Store:
    """A FineTuneJob stored before a rule it breaks existed (lora.r above the bound)."""
    store = Store()
    spec = {"method": {"type": "lora", "lora": {"r": 100000}}, "runPolicy": {"ttlSecondsAfterFinished": 30}}
    store.set_parent("ADDED", _ftj(spec, status))
    return store


class DeletingKube(FakeKube):
    def __init__(self) -> None:
        super().__init__([])
        self.deleted: list[tuple] = []

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.deleted.append((kind, namespace, name))


def test_a_job_with_an_invalid_stored_spec_fails_and_still_expires() -> None:
    kube = DeletingKube()
    result = ftj_reconcile.reconcile(kube, _invalid_spec_store({}), (NS, NAME))  # type: ignore[arg-type]
    [patch] = kube.status_patches
    assert patch["phase"] == "Failed"
    assert next(c for c in patch["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"
    assert result.requeue_after == 31  # looked at again when runPolicy.ttlSecondsAfterFinished is up
    assert not kube.deleted
    # Later: finished longer ago than the TTL, so the job is deleted.
    done = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)).isoformat()
    ftj_reconcile.reconcile(kube, _invalid_spec_store({**patch, "completionTime": done}), (NS, NAME))  # type: ignore[arg-type]
    assert kube.deleted == [("FineTuneJob", NS, NAME)]
