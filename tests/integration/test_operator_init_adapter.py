"""baseModel.initAdapter on the real control plane: a FineTuneJob that continues another's adapter
waits for it, starts with its adapter URI in the trainer config, and fails clearly when it cannot."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

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

ADAPTER = "s3://checkpoints/runs/ns/task-1/uid/final/"


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with running_operator(cluster, tmp_path_factory.mktemp("operator"), resync_seconds=30) as op:
        yield op


@pytest.fixture
def ns(cluster: ControlPlane, namespace: str, operator: OperatorProcess) -> str:
    make_s3_secret(cluster, namespace)
    return namespace


def continuing(name: str, ref: str, **spec) -> dict:
    body = finetunejob(name, pod_labels=HOLD, **spec)
    body["spec"]["baseModel"]["initAdapter"] = {"fineTuneJobRef": {"name": ref}}
    return body


def condition(st: dict, kind: str = "InitAdapterReady") -> dict:
    return next(c for c in st.get("conditions") or [] if c["type"] == kind)


def trainer_config(cluster: ControlPlane, ns: str, name: str) -> dict:
    cm = get(cluster, ns, "configmap", f"{name}-config") or {}
    return yaml.safe_load(cm["data"]["config.yaml"])


def test_a_job_continues_another_jobs_adapter_once_it_succeeded(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("task-1", pod_labels=HOLD))
    apply(cluster, ns, continuing("task-2", "task-1"))

    def waiting():
        st = status(cluster, ns, "task-2")
        c = next((c for c in st.get("conditions") or [] if c["type"] == "InitAdapterReady"), None)
        return st if c and "task-1" in c["message"] else None

    st = eventually(waiting, timeout=60, what="task-2 to wait for task-1")
    c = condition(st)
    assert c["status"] == "False" and c["reason"] == "WaitingForFineTuneJob"
    assert "waiting for FineTuneJob task-1 to succeed" in c["message"]
    assert st["phase"] == "Pending" and st["observedGeneration"] == 1
    assert get(cluster, ns, "job", "task-2-1") is None  # nothing starts before the adapter exists

    [pod] = eventually(
        lambda: [
            p
            for p in pods(cluster, ns, "kubetune.io/finetunejob=task-1")
            if p["status"].get("phase") == "Running"
        ],
        timeout=60,
        what="task-1's pod to run",
    )
    wait_phase(cluster, ns, "task-1", "Running")
    report = {"adapterUri": ADAPTER, "trainableParameters": 10, "totalParameters": 100}
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0, json.dumps(report))
    wait_phase(cluster, ns, "task-1", "Succeeded")

    # task-1's change wakes task-2 (the referrer index), well before the 30 s resync.
    job = eventually(lambda: get(cluster, ns, "job", "task-2-1"), timeout=20, what="task-2's Job")
    assert job is not None

    def resolved():
        st = status(cluster, ns, "task-2")
        return st if st.get("initAdapterUri") and condition(st)["status"] == "True" else None

    st = eventually(resolved, timeout=20, what="task-2's status to name the adapter, InitAdapterReady True")
    assert st["initAdapterUri"] == ADAPTER
    c = condition(st)
    assert c["status"] == "True" and c["reason"] == "Resolved" and ADAPTER in c["message"]
    cfg = trainer_config(cluster, ns, "task-2")
    assert cfg["init_adapter"] == ADAPTER and cfg["model_name"] == "s3://models/tiny-llama"


def test_an_adapter_uri_is_used_as_given(cluster: ControlPlane, ns: str) -> None:
    body = finetunejob("from-uri", pod_labels=HOLD)
    body["spec"]["baseModel"]["initAdapter"] = {"uri": "s3://adapters/support/v3/"}
    apply(cluster, ns, body)
    eventually(lambda: get(cluster, ns, "job", "from-uri-1"), timeout=60, what="from-uri's Job")
    assert trainer_config(cluster, ns, "from-uri")["init_adapter"] == "s3://adapters/support/v3/"
    eventually(
        lambda: status(cluster, ns, "from-uri").get("initAdapterUri") == "s3://adapters/support/v3/",
        timeout=20,
        what="from-uri's status to name the adapter",
    )


def test_a_failed_or_mismatched_job_fails_the_continuation(cluster: ControlPlane, ns: str) -> None:
    # A configuration error (exit code 3) fails the referenced job without a retry.
    apply(
        cluster,
        ns,
        finetunejob(
            "broken",
            pod_labels={"kwok.kubetune.io/outcome": "fail"},
            pod_annotations={"kwok.kubetune.io/exit-code": "3"},
        ),
    )
    apply(cluster, ns, continuing("after-broken", "broken"))
    st = wait_phase(cluster, ns, "after-broken", "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "InitAdapterUnavailable"
    assert "FineTuneJob broken failed, so it has no adapter to continue" in failed["message"]
    assert get(cluster, ns, "job", "after-broken-1") is None

    apply(cluster, ns, finetunejob("soft-prompt", pod_labels=HOLD, method={"type": "prompt"}))
    apply(cluster, ns, continuing("lora-on-prompt", "soft-prompt"))
    st = wait_phase(cluster, ns, "lora-on-prompt", "Failed")
    assert (
        "trains a prompt adapter and this job's method.type is lora: set method.type to prompt"
        in (condition(st, "Failed")["message"])
    )

    apply(cluster, ns, continuing("myself", "myself"))
    st = wait_phase(cluster, ns, "myself", "Failed")
    assert "names this FineTuneJob (myself) itself" in condition(st, "Failed")["message"]
