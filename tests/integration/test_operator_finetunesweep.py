"""The operator running FineTuneSweeps on the real control plane.

Trials are real FineTuneJobs reconciled by the real operator; their pods run on kwok's fake
nodes, so the test plays the trainer as the other operator tests do: it patches a trial's
status.progress (what rank 0 reports) and finishes its pod with the trainer's report.
"""

from __future__ import annotations

import json
import math
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
    install_crds,
    make_s3_secret,
    pods,
    running_operator,
)
from tests.testground.cluster import ControlPlane
from tests.testground.operator import OperatorProcess

pytestmark = pytest.mark.cluster

LR = "hyperparameters.learningRate"
RANK = "method.lora.r"


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    cluster.kubectl("wait", "--for=condition=Established", "crd/finetunesweeps.kubetune.io", "--timeout=60s")
    with running_operator(cluster, tmp_path_factory.mktemp("operator"), resync_seconds=5) as op:
        yield op


@pytest.fixture
def ns(cluster: ControlPlane, namespace: str, operator: OperatorProcess) -> str:
    make_s3_secret(cluster, namespace)
    return namespace


def sweep(name: str, parameters: list[dict], **spec) -> dict:
    template = finetunejob("t", pod_labels=HOLD)["spec"]
    template["dataset"]["validationSplit"] = 0.1
    template["evaluation"] = {"everySteps": 10}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {"template": template, "parameters": parameters, **spec},
    }


def sweep_status(cluster: ControlPlane, ns: str, name: str) -> dict:
    return (get(cluster, ns, "finetunesweep", name) or {}).get("status") or {}


def trials(cluster: ControlPlane, ns: str, name: str) -> list[dict]:
    out = cluster.kubectl(
        "get", "finetunejobs", "-l", f"kubetune.io/finetunesweep={name}", "-o", "json", namespace=ns
    )
    return sorted(
        json.loads(out.stdout)["items"], key=lambda j: int(j["metadata"]["labels"]["kubetune.io/trial"])
    )


def trial_params(job: dict) -> dict:
    return json.loads(job["metadata"]["annotations"]["kubetune.io/trial"])["params"]


def wait_trials(cluster: ControlPlane, ns: str, name: str, n: int, timeout: float = 60) -> list[dict]:
    def enough():
        ts = trials(cluster, ns, name)
        return ts if len(ts) >= n else None

    return eventually(enough, timeout=timeout, what=f"{n} trials of sweep {name}")


def wait_sweep(cluster: ControlPlane, ns: str, name: str, check, what: str, timeout: float = 60) -> dict:
    def ok():
        st = sweep_status(cluster, ns, name)
        return st if check(st) else None

    try:
        return eventually(ok, timeout=timeout, what=what)
    except AssertionError as e:
        raise AssertionError(
            f"{e}; last status: {json.dumps(sweep_status(cluster, ns, name), indent=1)}"
        ) from None


def row(st: dict, trial: str) -> dict:
    return next((r for r in st.get("trials") or [] if r["name"] == trial), {})


def running_pod(cluster: ControlPlane, ns: str, trial: str) -> dict:
    def check():
        ps = [
            p
            for p in pods(cluster, ns, f"kubetune.io/finetunejob={trial}")
            if p["status"].get("phase") == "Running"
        ]
        return ps[0] if ps else None

    return eventually(check, timeout=60, what=f"a running pod of trial {trial}")


def report_progress(cluster: ControlPlane, ns: str, trial: str, step: int, eval_loss: float) -> None:
    """What the trainer's rank 0 patches after an evaluation."""
    client.CustomObjectsApi(cluster.api_client()).patch_namespaced_custom_object_status(
        "kubetune.io",
        "v1alpha1",
        ns,
        "finetunejobs",
        trial,
        {"status": {"progress": {"step": step, "totalSteps": 100, "evalLoss": eval_loss}}},
    )


def finish_trial(cluster: ControlPlane, ns: str, trial: str, eval_loss: float) -> str:
    """Finish the trial's pod with the trainer's success report; the trial's FineTuneJob Succeeds."""
    pod = running_pod(cluster, ns, trial)
    uri = f"s3://checkpoints/runs/{ns}/{trial}/final/"
    report = {"adapterUri": uri, "metrics": {"eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)}}
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0, json.dumps(report))
    eventually(
        lambda: (
            ((get(cluster, ns, "finetunejob", trial) or {}).get("status") or {}).get("phase") == "Succeeded"
        ),
        timeout=60,
        what=f"trial {trial} to succeed",
    )
    return uri


def active(jobs: list[dict]) -> list[dict]:
    return [
        j
        for j in jobs
        if (j.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and not j["spec"].get("runPolicy", {}).get("suspend")
    ]


def test_grid_sweep_runs_every_point_once_within_parallelism_and_reports_the_best(
    cluster: ControlPlane, ns: str
) -> None:
    params = [{"path": LR, "values": [1e-4, 3e-4]}, {"path": RANK, "values": [8, 16]}]
    apply(cluster, ns, sweep("grid", params, parallelism=2))
    first = wait_trials(cluster, ns, "grid", 2)
    obj = get(cluster, ns, "finetunesweep", "grid")
    assert obj is not None
    uid = obj["metadata"]["uid"]
    for job in first:
        assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [uid]
        # The trial's FineTuneJob is the template with its parameters set, as the API server stores it.
        p = trial_params(job)
        assert job["spec"]["hyperparameters"]["learningRate"] == p[LR]
        assert job["spec"]["method"]["lora"]["r"] == p[RANK] and isinstance(p[RANK], int)
    st = wait_sweep(cluster, ns, "grid", lambda s: s.get("phase") == "Running", "the sweep to run")
    assert st["totalTrials"] == 4 and st["observedGeneration"] == obj["metadata"]["generation"]

    losses = {}
    seen: list[dict] = []
    for round_ in range(2):
        jobs = wait_trials(cluster, ns, "grid", 2 * (round_ + 1))
        # Never more than parallelism trials at once, and no trial beyond them yet.
        assert len(jobs) == 2 * (round_ + 1) and len(active(jobs)) <= 2
        for job in jobs[2 * round_ :]:
            name = job["metadata"]["name"]
            p = trial_params(job)
            loss = 1.0 + p[LR] * 1000 - p[RANK] / 100  # the best point: lr 1e-4, r 16
            losses[name] = (loss, finish_trial(cluster, ns, name, loss))
            seen.append(p)
    st = wait_sweep(cluster, ns, "grid", lambda s: s.get("phase") == "Succeeded", "the sweep to succeed")
    # Every grid point exactly once, and no fifth trial.
    assert sorted((p[LR], p[RANK]) for p in seen) == [(1e-4, 8), (1e-4, 16), (3e-4, 8), (3e-4, 16)]
    assert len(trials(cluster, ns, "grid")) == 4
    best_name = min(losses, key=lambda n: losses[n][0])
    assert st["bestTrial"]["name"] == best_name
    assert st["bestTrial"]["objective"] == pytest.approx(losses[best_name][0])
    assert st["bestTrial"]["adapterUri"] == losses[best_name][1]
    assert st["bestTrial"]["parameters"] == {LR: "0.0001", RANK: "16"}
    assert (st["succeeded"], st["pruned"], st["failed"], st["running"], st["completed"]) == (
        4,
        0,
        0,
        0,
        "4/4",
    )
    assert [r["phase"] for r in st["trials"]] == ["Succeeded"] * 4
    succeeded = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["observedGeneration"] == obj["metadata"]["generation"]
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    reasons = [e["reason"] for e in events if e["involvedObject"].get("name") == "grid"]
    assert reasons.count("TrialCreated") == 4 and "Succeeded" in reasons
    # kubectl get shows how far it is and the best so far.
    out = cluster.kubectl("get", "fts", "grid", namespace=ns).stdout
    assert "4/4" in out and best_name in out, out


def test_median_rule_prunes_a_trial_from_its_progress_and_frees_its_slot(
    cluster: ControlPlane, ns: str
) -> None:
    params = [{"path": LR, "values": [1e-4, 2e-4, 3e-4]}]
    apply(
        cluster,
        ns,
        sweep("prune", params, parallelism=1, earlyStopping={"rule": "median", "startupTrials": 1}),
    )
    [t0] = wait_trials(cluster, ns, "prune", 1)
    first = t0["metadata"]["name"]
    running_pod(cluster, ns, first)
    for step, loss in ((10, 2.0), (20, 1.5)):
        report_progress(cluster, ns, first, step, loss)
        wait_sweep(
            cluster,
            ns,
            "prune",
            lambda s, step=step: any(e["step"] == step for e in row(s, first).get("evaluations") or []),
            f"the sweep to record {first}'s evaluation at step {step}",
        )
    finish_trial(cluster, ns, first, 1.4)
    second = wait_trials(cluster, ns, "prune", 2)[1]["metadata"]["name"]
    running_pod(cluster, ns, second)
    # Better than the first trial at step 10: goes on.
    report_progress(cluster, ns, second, 10, 1.8)
    st = wait_sweep(
        cluster,
        ns,
        "prune",
        lambda s: (row(s, second).get("evaluations") or [{}])[-1].get("step") == 10,
        "step 10",
    )
    assert row(st, second)["phase"] == "Running" and len(trials(cluster, ns, "prune")) == 2
    # Worse than the first trial at step 20 (the median of one finished trial): pruned.
    report_progress(cluster, ns, second, 23, 3.0)  # reported a little after the evaluation at step 20
    st = wait_sweep(
        cluster, ns, "prune", lambda s: row(s, second).get("phase") == "Pruned", "the trial to be pruned"
    )
    assert "stopped early at step 20" in row(st, second)["message"]
    job = get(cluster, ns, "finetunejob", second)
    assert job is not None
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert json.loads(job["metadata"]["annotations"]["kubetune.io/pruned"]) == {"step": 20, "value": 3.0}
    # The trial's FineTuneJob stays (its record and checkpoints), suspended: its pods go away.
    eventually(
        lambda: (
            ((get(cluster, ns, "finetunejob", second) or {}).get("status") or {}).get("phase") == "Suspended"
        ),
        timeout=60,
        what="the pruned trial to be Suspended",
    )
    # Its slot is free: the third trial starts although parallelism is 1.
    third = wait_trials(cluster, ns, "prune", 3)[2]["metadata"]["name"]
    finish_trial(cluster, ns, third, 1.6)
    st = wait_sweep(cluster, ns, "prune", lambda s: s.get("phase") == "Succeeded", "the sweep to succeed")
    assert (st["succeeded"], st["pruned"], st["completed"]) == (2, 1, "3/3")
    assert st["bestTrial"]["name"] == first
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert any(e["reason"] == "TrialPruned" and second in e["message"] for e in events)


def test_operator_restart_mid_sweep_creates_no_duplicate_trial(
    cluster: ControlPlane, ns: str, operator: OperatorProcess
) -> None:
    params = [{"path": LR, "min": 1e-5, "max": 1e-3, "scale": "log"}, {"path": RANK, "min": 4, "max": 64}]
    apply(cluster, ns, sweep("restart", params, algorithm="random", seed=7, maxTrials=4, parallelism=2))
    before = wait_trials(cluster, ns, "restart", 2)
    wait_sweep(cluster, ns, "restart", lambda s: len(s.get("trials") or []) == 2, "two status rows")
    operator.stop()
    operator.start()
    # The new operator reconciles the sweep (resync every 5 s) and starts nothing new.
    st = wait_sweep(
        cluster,
        ns,
        "restart",
        lambda s: s.get("running") == 2,
        "the restarted operator to report",
        timeout=30,
    )
    after = trials(cluster, ns, "restart")
    assert [j["metadata"]["uid"] for j in after] == [j["metadata"]["uid"] for j in before]
    assert [trial_params(j) for j in after] == [trial_params(j) for j in before]
    assert [r["name"] for r in st["trials"]] == ["restart-0", "restart-1"]
    # Finishing one frees one slot: exactly one more trial, with a new point.
    finish_trial(cluster, ns, "restart-0", 1.2)
    jobs = wait_trials(cluster, ns, "restart", 3)
    st = wait_sweep(cluster, ns, "restart", lambda s: len(s.get("trials") or []) == 3, "three status rows")
    assert len(trials(cluster, ns, "restart")) == 3
    points = [tuple(sorted(trial_params(j).items())) for j in jobs]
    assert len(set(points)) == 3, points
    for p in map(dict, points):
        assert 1e-5 <= p[LR] <= 1e-3 and 4 <= p[RANK] <= 64 and isinstance(p[RANK], int)


def test_adapterdeployment_serves_the_best_trial_once_the_sweep_succeeds(
    cluster: ControlPlane, ns: str
) -> None:
    apply(cluster, ns, sweep("serve", [{"path": LR, "values": [1e-4, 5e-4]}], parallelism=2))
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "best"},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama"},
            "adapters": [{"name": "winner", "fineTuneSweepRef": {"name": "serve"}}],
        },
    }
    apply(cluster, ns, adep)

    def adep_status():
        return ((get(cluster, ns, "adapterdeployment", "best") or {}).get("status")) or {}

    waiting = eventually(
        lambda: (s := adep_status()).get("conditions") and s,
        timeout=60,
        what="the AdapterDeployment to report",
    )
    resolved = next(c for c in waiting["conditions"] if c["type"] == "AdaptersResolved")
    assert resolved["status"] == "False" and resolved["reason"] == "WaitingForFineTuneSweep", resolved
    assert "waiting for FineTuneSweep serve" in resolved["message"]
    jobs = wait_trials(cluster, ns, "serve", 2)
    uris = {}
    for job, loss in zip(jobs, (1.3, 0.9), strict=True):
        uris[job["metadata"]["name"]] = finish_trial(cluster, ns, job["metadata"]["name"], loss)
    st = wait_sweep(cluster, ns, "serve", lambda s: s.get("phase") == "Succeeded", "the sweep to succeed")
    best_uri = uris[st["bestTrial"]["name"]]
    assert st["bestTrial"]["name"] == jobs[1]["metadata"]["name"]

    def served():
        s = adep_status()
        a = next((a for a in s.get("adapters") or [] if a["name"] == "winner"), {})
        return s if a.get("uri") == best_uri else None

    s = eventually(served, timeout=60, what="the AdapterDeployment to resolve the best trial's adapter")
    resolved = next(c for c in s["conditions"] if c["type"] == "AdaptersResolved")
    assert resolved["status"] == "True"
    cm = get(cluster, ns, "configmap", "best-adapters") or {}
    assert best_uri in json.dumps(cm.get("data") or {}), cm


def test_operator_killed_right_after_creating_trials_resumes_without_duplicates(
    cluster: ControlPlane, ns: str, operator: OperatorProcess
) -> None:
    """Stopped the moment the first trial exists, maybe before the sweep's status was written."""
    params = [{"path": LR, "min": 1e-5, "max": 1e-3, "scale": "log"}]
    apply(cluster, ns, sweep("crash", params, algorithm="tpe", seed=3, maxTrials=3, parallelism=3))
    wait_trials(cluster, ns, "crash", 1, timeout=60)
    operator.stop()
    operator.start()
    jobs = wait_trials(cluster, ns, "crash", 3)
    st = wait_sweep(cluster, ns, "crash", lambda s: len(s.get("trials") or []) == 3, "three status rows")
    jobs = trials(cluster, ns, "crash")
    assert [j["metadata"]["name"] for j in jobs] == ["crash-0", "crash-1", "crash-2"]
    assert len({trial_params(j)[LR] for j in jobs}) == 3
    assert st["created"] == 3 and st["running"] == 3


def test_a_failed_sweep_degrades_the_adapterdeployment_that_serves_it(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, sweep("doomed", [{"path": RANK, "values": [8]}]))
    [job] = wait_trials(cluster, ns, "doomed", 1)
    pod = running_pod(cluster, ns, job["metadata"]["name"])
    # Exit code 2: the trainer rejected its configuration, which is not retried.
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 2, "lora.r: not supported by this model")
    st = wait_sweep(cluster, ns, "doomed", lambda s: s.get("phase") == "Failed", "the sweep to fail")
    assert st["failed"] == 1 and "bestTrial" not in st
    assert "lora.r: not supported" in st["trials"][0]["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NoTrialSucceeded"
    apply(
        cluster,
        ns,
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "doomed-serve"},
            "spec": {
                "baseModel": {"uri": "s3://models/tiny-llama"},
                "adapters": [{"name": "best", "fineTuneSweepRef": {"name": "doomed"}}],
            },
        },
    )

    def degraded():
        s = ((get(cluster, ns, "adapterdeployment", "doomed-serve") or {}).get("status")) or {}
        return s if s.get("phase") == "Degraded" else None

    s = eventually(degraded, timeout=60, what="the AdapterDeployment to be Degraded")
    resolved = next(c for c in s["conditions"] if c["type"] == "AdaptersResolved")
    assert (
        resolved["reason"] == "FineTuneSweepFailed" and "FineTuneSweep doomed failed" in resolved["message"]
    )


def test_a_space_optuna_cannot_use_fails_the_sweep_with_the_reason(cluster: ControlPlane, ns: str) -> None:
    """The API server's rules cannot bound a grid's size (a product): the operator refuses it."""
    apply(cluster, ns, sweep("huge", [{"path": LR, "min": 1e-6, "max": 1e-3, "step": 1e-9}]))
    st = wait_sweep(cluster, ns, "huge", lambda s: s.get("phase") == "Failed", "the sweep to fail")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSearchSpace" and "more than 100000" in failed["message"]
    assert trials(cluster, ns, "huge") == []


def test_a_trial_the_finetunejob_rules_refuse_fails_the_sweep_naming_them(
    cluster: ControlPlane, ns: str
) -> None:
    """fp16 needs GPUs: a FineTuneJob rule the sweep's own rules do not repeat."""
    body = sweep("cpu", [{"path": "hyperparameters.precision", "choices": ["fp16"]}])
    body["spec"]["template"]["resources"] = {"nodes": 1, "gpusPerNode": 0}
    apply(cluster, ns, body)
    st = wait_sweep(cluster, ns, "cpu", lambda s: s.get("phase") == "Failed", "the sweep to fail")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrialRejected", failed
    assert "cpu-0" in failed["message"] and "precision fp16 needs GPUs" in failed["message"]
    assert trials(cluster, ns, "cpu") == []


def test_a_trial_deleted_by_hand_keeps_its_row_and_is_not_run_again(cluster: ControlPlane, ns: str) -> None:
    params = [{"path": LR, "values": [1e-4, 2e-4, 3e-4]}]
    apply(cluster, ns, sweep("gone", params, parallelism=2, earlyStopping={"startupTrials": 1}))
    wait_trials(cluster, ns, "gone", 2)
    wait_sweep(cluster, ns, "gone", lambda s: len(s.get("trials") or []) == 2, "two status rows")
    cluster.kubectl("delete", "finetunejob", "gone-0", namespace=ns)
    running_pod(cluster, ns, "gone-1")
    report_progress(cluster, ns, "gone-1", 10, 2.0)  # early stopping looks at gone-1 beside the deleted row
    st = wait_sweep(
        cluster,
        ns,
        "gone",
        lambda s: row(s, "gone-0").get("phase") == "Failed" and row(s, "gone-1").get("evaluations"),
        "the deleted trial's row to say so",
    )
    assert row(st, "gone-0")["message"] == "its FineTuneJob was deleted"
    # Its slot went to a new number; gone-0 is not created again.
    wait_trials(cluster, ns, "gone", 2)
    names = [j["metadata"]["name"] for j in trials(cluster, ns, "gone")]
    assert names == ["gone-1", "gone-2"], names
