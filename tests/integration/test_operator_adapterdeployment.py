"""The operator reconciling AdapterDeployments on the real control plane."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

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
    wait_phase,
)
from tests.testground.cluster import ControlPlane
from tests.testground.operator import OperatorProcess

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path_factory.mktemp("operator-adep"), resync_seconds=5
    ).start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def ns(cluster: ControlPlane, namespace: str, operator: OperatorProcess) -> str:
    make_s3_secret(cluster, namespace)
    return namespace


def adapterdeployment(name: str, adapters: list[dict], **spec) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama"},
            "adapters": adapters,
            "storage": {"secretRef": {"name": "s3-credentials"}},
            **spec,
        },
    }


def adep_status(cluster: ControlPlane, ns: str, name: str) -> dict:
    return (get(cluster, ns, "adapterdeployment", name) or {}).get("status") or {}


def wait_adep(cluster: ControlPlane, ns: str, name: str, phase: str, timeout: float = 60) -> dict:
    def check():
        st = adep_status(cluster, ns, name)
        return st if st.get("phase") == phase else None

    try:
        return eventually(check, timeout=timeout, what=f"AdapterDeployment {name} to be {phase}")
    except AssertionError as e:
        raise AssertionError(
            f"{e}; last status: {json.dumps(adep_status(cluster, ns, name), indent=1)}"
        ) from None


def test_builtin_runtime_with_two_adapters_becomes_ready(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        adapterdeployment(
            "assist",
            [
                {"name": "support", "source": "s3://adapters/support/"},
                {"name": "sql", "source": "s3://adapters/sql/"},
            ],
            replicas=2,
        ),
    )
    st = wait_adep(cluster, ns, "assist", "Ready")
    assert st["readyReplicas"] == 2
    assert st["endpoint"] == f"http://assist.{ns}.svc:8000/v1"
    assert {a["name"]: a["ready"] for a in st["adapters"]} == {"support": True, "sql": True}
    adep = get(cluster, ns, "adapterdeployment", "assist")
    assert adep is not None and st["observedGeneration"] == adep["metadata"]["generation"]
    dep = get(cluster, ns, "deployment", "assist")
    svc = get(cluster, ns, "service", "assist")
    assert dep is not None and svc is not None
    assert dep["metadata"]["ownerReferences"][0]["uid"] == adep["metadata"]["uid"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "serve"
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_vllm_runtime_renders_init_container_and_lora_flags(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        adapterdeployment(
            "vl", [{"name": "a1", "source": "s3://adapters/a1/"}], runtime="vllm", resources={"gpus": 1}
        ),
    )
    wait_adep(cluster, ns, "vl", "Ready")
    dep = get(cluster, ns, "deployment", "vl")
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-base-model", "fetch-adapters"]
    args = pod["containers"][0]["args"]
    assert "--enable-lora" in args and "a1=/adapters/a1" in args
    [p] = pods(cluster, ns, "kubetune.io/adapterdeployment=vl")
    assert p["spec"]["nodeName"].startswith("gpu-node-")


def test_finetunejob_ref_waits_then_resolves_to_the_jobs_output(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, finetunejob("trainer-job", pod_labels=HOLD))
    apply(
        cluster,
        ns,
        adapterdeployment(
            "fromjob",
            [
                {"name": "base-task", "source": "s3://adapters/x/"},
                {"name": "fresh", "fineTuneJobRef": {"name": "trainer-job"}},
            ],
        ),
    )

    def waiting():
        st = adep_status(cluster, ns, "fromjob")
        cond = next((c for c in st.get("conditions") or [] if c["type"] == "AdaptersResolved"), None)
        return cond if cond and cond["reason"] == "WaitingForFineTuneJob" else None

    cond = eventually(waiting, timeout=60, what="the AdaptersResolved=False/WaitingForFineTuneJob condition")
    assert "trainer-job" in cond["message"]
    st = adep_status(cluster, ns, "fromjob")
    assert st["phase"] == "Progressing"
    # Finish the training: the adapter resolves to the job's output and rolls out.
    [pod] = [
        p
        for p in pods(cluster, ns, "kubetune.io/finetunejob=trainer-job")
        if p["status"].get("phase") == "Running"
    ]
    finish_pod(
        cluster.api_client(),
        ns,
        pod["metadata"]["name"],
        0,
        json.dumps({"adapterUri": "s3://out/fresh/final/"}),
    )
    wait_phase(cluster, ns, "trainer-job", "Succeeded")
    st = wait_adep(cluster, ns, "fromjob", "Ready")
    fresh = next(a for a in st["adapters"] if a["name"] == "fresh")
    assert fresh == {"name": "fresh", "uri": "s3://out/fresh/final/", "ready": True, "message": "served"}
    cm = get(cluster, ns, "configmap", "fromjob-adapters")
    assert cm is not None and "s3://out/fresh/final/" in cm["data"]["adapters.json"]


def test_a_failed_finetunejob_degrades_the_deployment(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        finetunejob(
            "broken",
            pod_labels={"kwok.kubetune.io/outcome": "fail"},
            pod_annotations={"kwok.kubetune.io/exit-code": "3"},
        ),
    )
    apply(
        cluster, ns, adapterdeployment("needs-broken", [{"name": "b", "fineTuneJobRef": {"name": "broken"}}])
    )
    st = wait_adep(cluster, ns, "needs-broken", "Degraded")
    cond = next(c for c in st["conditions"] if c["type"] == "AdaptersResolved")
    assert cond["reason"] == "FineTuneJobFailed" and "InvalidData" in cond["message"]


def test_changing_the_adapter_list_rolls_out_a_new_template(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, adapterdeployment("roll", [{"name": "one", "source": "s3://adapters/one/"}]))
    wait_adep(cluster, ns, "roll", "Ready")
    before = get(cluster, ns, "deployment", "roll")
    assert before is not None
    apply(
        cluster,
        ns,
        adapterdeployment(
            "roll",
            [
                {"name": "one", "source": "s3://adapters/one/"},
                {"name": "two", "source": "s3://adapters/two/"},
            ],
        ),
    )

    def rolled():
        dep = get(cluster, ns, "deployment", "roll")
        return dep if dep and dep["metadata"]["generation"] > before["metadata"]["generation"] else None

    after = eventually(rolled, timeout=30, what="the Deployment to get a new template")
    key = "kubetune.io/adapter-set"
    assert (
        after["spec"]["template"]["metadata"]["annotations"][key]
        != before["spec"]["template"]["metadata"]["annotations"][key]
    )
    assert after["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    st = wait_adep(cluster, ns, "roll", "Ready")
    assert sorted(a["name"] for a in st["adapters"] if a["ready"]) == ["one", "two"]
    cm = get(cluster, ns, "configmap", "roll-adapters")
    assert cm is not None and '"two"' in cm["data"]["adapters.json"]


def test_hot_reload_updates_the_adapter_set_without_a_new_template(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        adapterdeployment("hot", [{"name": "one", "source": "s3://adapters/one/"}], hotReload=True),
    )
    wait_adep(cluster, ns, "hot", "Ready")
    before = get(cluster, ns, "deployment", "hot")
    apply(
        cluster,
        ns,
        adapterdeployment(
            "hot",
            [
                {"name": "one", "source": "s3://adapters/one/"},
                {"name": "two", "source": "s3://adapters/two/"},
            ],
            hotReload=True,
        ),
    )
    eventually(
        lambda: (
            '"two"'
            in (get(cluster, ns, "configmap", "hot-adapters") or {}).get("data", {}).get("adapters.json", "")
        ),
        timeout=30,
        what="the adapter set ConfigMap to list the new adapter",
    )
    after = get(cluster, ns, "deployment", "hot")
    assert before is not None and after is not None
    assert after["spec"]["template"] == before["spec"]["template"]
    # The operator does not see each pod's hot load, and its status does not pretend to.
    two = eventually(
        lambda: next(
            (a for a in adep_status(cluster, ns, "hot").get("adapters", []) if a["name"] == "two"), None
        ),
        timeout=30,
        what="adapter two in the status",
    )
    assert two["ready"] is True and "hot reload" in two["message"] and "adapter-sync" in two["message"]


def test_autoscaling_creates_an_hpa_and_leaves_replicas_to_it(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        adapterdeployment(
            "scaled",
            [{"name": "one", "source": "s3://adapters/one/"}],
            autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60},
            resources={"cpu": "1"},
        ),
    )
    hpa = eventually(lambda: get(cluster, ns, "hpa", "scaled"), timeout=30, what="the HPA")
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    # The HPA controller (real, in kube-controller-manager) scales the Deployment up to minReplicas.
    eventually(
        lambda: (get(cluster, ns, "deployment", "scaled") or {}).get("spec", {}).get("replicas") == 2,
        timeout=60,
        what="the HPA to set replicas to minReplicas",
    )


def _available(st: dict) -> dict:
    return next(c for c in st["conditions"] if c["type"] == "Available")


def _set_pod_ready(cluster: ControlPlane, ns: str, pod: str, ready: bool) -> None:
    """Play the kubelet: a readiness probe that starts failing (or passes again)."""
    value = "True" if ready else "False"
    patch = {
        "status": {
            "conditions": [{"type": "Ready", "status": value}, {"type": "ContainersReady", "status": value}]
        }
    }
    cluster.kubectl(
        "patch", "pod", pod, "--subresource=status", "--type=strategic", "-p", json.dumps(patch), namespace=ns
    )


def test_a_serving_deployment_without_ready_pods_is_degraded(cluster: ControlPlane, ns: str) -> None:
    apply(cluster, ns, adapterdeployment("flappy", [{"name": "a", "source": "s3://adapters/a/"}]))
    wait_adep(cluster, ns, "flappy", "Ready")
    [pod] = pods(cluster, ns, "kubetune.io/adapterdeployment=flappy")
    _set_pod_ready(cluster, ns, pod["metadata"]["name"], False)
    st = wait_adep(cluster, ns, "flappy", "Degraded")
    cond = _available(st)
    assert cond["status"] == "False" and cond["reason"] == "ServerUnavailable"
    assert "0/1 replicas ready" in cond["message"]
    assert st["adapters"][0]["ready"] is False and "ServerUnavailable" in st["adapters"][0]["message"]
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert any(
        e["reason"] == "Degraded" and e["type"] == "Warning" and "ServerUnavailable" in e["message"]
        for e in events
        if e["involvedObject"].get("name") == "flappy"
    )
    _set_pod_ready(cluster, ns, pod["metadata"]["name"], True)
    st = wait_adep(cluster, ns, "flappy", "Ready")
    assert _available(st)["reason"] == "MinimumReplicasAvailable"


def test_a_rollout_past_its_progress_deadline_is_degraded(cluster: ControlPlane, ns: str) -> None:
    apply(
        cluster,
        ns,
        adapterdeployment(
            "stuck",
            [{"name": "a", "source": "s3://adapters/a/"}],
            nodeSelector={"kubetune.io/no-such-node": "x"},
        ),
    )
    eventually(lambda: get(cluster, ns, "deployment", "stuck"), timeout=30, what="Deployment stuck")
    assert adep_status(cluster, ns, "stuck").get("phase") != "Degraded"
    # As an admin would for a quick test: the controller default is 600 s (the operator leaves the field alone).
    cluster.kubectl(
        "patch",
        "deployment",
        "stuck",
        "--type=merge",
        "-p",
        '{"spec":{"progressDeadlineSeconds":1}}',
        namespace=ns,
    )
    st = wait_adep(cluster, ns, "stuck", "Degraded", timeout=60)
    cond = _available(st)
    assert cond["status"] == "False" and cond["reason"] == "ProgressDeadlineExceeded"
    assert "progress" in cond["message"] and "0/1 replicas ready" in cond["message"]


def test_pods_that_cannot_be_created_degrade_the_deployment(cluster: ControlPlane, ns: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    apply(cluster, ns, quota)
    apply(cluster, ns, adapterdeployment("blocked", [{"name": "a", "source": "s3://adapters/a/"}]))
    st = wait_adep(cluster, ns, "blocked", "Degraded", timeout=60)
    cond = _available(st)
    assert cond["status"] == "False" and cond["reason"] == "ReplicaFailure"
    assert "cannot create its pods" in cond["message"] and "quota" in cond["message"]


def test_auth_and_network_policy(cluster: ControlPlane, ns: str) -> None:
    """spec.auth wires the keys from Secrets into the pods; spec.networkPolicy is an owned child that
    goes away when the field is removed."""
    cluster.kubectl("create", "secret", "generic", "serve-keys", "--from-literal=api-keys=sk-a", namespace=ns)
    auth = {"apiKeySecretRef": {"name": "serve-keys"}, "adminKeySecretRef": {"name": "serve-keys"}}
    policy = {"allowFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}
    adapters = [{"name": "one", "source": "s3://adapters/one/"}]
    apply(
        cluster, ns, adapterdeployment("guarded", adapters, hotReload=True, auth=auth, networkPolicy=policy)
    )
    np = eventually(
        lambda: get(cluster, ns, "networkpolicy", "guarded"), timeout=30, what="the NetworkPolicy"
    )
    assert np["metadata"]["ownerReferences"][0]["kind"] == "AdapterDeployment"
    assert np["spec"]["ingress"][0]["from"] == policy["allowFrom"]
    assert np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    pod_spec = eventually(
        lambda: get(cluster, ns, "deployment", "guarded"), timeout=30, what="the Deployment"
    )["spec"]["template"]["spec"]
    server, sidecar = pod_spec["containers"]
    assert "--api-key-file" in server["args"] and "--admin-key-file" in server["args"]
    [auth_volume] = [v for v in pod_spec["volumes"] if v["name"] == "auth"]
    assert {s["secret"]["name"] for s in auth_volume["projected"]["sources"]} == {"serve-keys"}
    key_env = next(e for e in sidecar["env"] if e["name"] == "KUBETUNE_SERVER_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "serve-keys", "key": "admin-key"}
    assert "sk-a" not in json.dumps(get(cluster, ns, "deployment", "guarded"))

    apply(cluster, ns, adapterdeployment("guarded", adapters, hotReload=True, auth=auth))
    eventually(
        lambda: get(cluster, ns, "networkpolicy", "guarded") is None, timeout=30, what="the policy to go"
    )


def _finish_training(cluster: ControlPlane, ns: str, job: str, report: dict) -> None:
    """Play the trainer: its pod exits 0 with this success report."""
    pod = eventually(
        lambda: next(
            (
                p
                for p in pods(cluster, ns, f"kubetune.io/finetunejob={job}")
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
        timeout=60,
        what=f"a running pod of {job}",
    )
    finish_pod(cluster.api_client(), ns, pod["metadata"]["name"], 0, json.dumps(report))
    wait_phase(cluster, ns, job, "Succeeded")


def _server_args(cluster: ControlPlane, ns: str, name: str) -> list[str]:
    dep = get(cluster, ns, "deployment", name)
    assert dep is not None
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_vllm_sizes_lora_slots_from_the_rank_the_trainer_reports(cluster: ControlPlane, ns: str) -> None:
    # The spec says r 16, the saved adapter has r 96 (the report): vLLM must fit 96 -> 128 slots.
    # (Before status.output.rank, a QLoRA job's rank was not read at all: vLLM got 64 and refused it.)
    method = {"type": "qlora", "qlora": {"r": 16}}
    apply(cluster, ns, finetunejob("q-job", pod_labels=HOLD, method=method))
    _finish_training(cluster, ns, "q-job", {"adapterUri": "s3://out/q/final/", "method": "qlora", "rank": 96})
    ftj = get(cluster, ns, "finetunejob", "q-job")
    assert ftj is not None and ftj["status"]["output"]["rank"] == 96
    apply(
        cluster,
        ns,
        adapterdeployment(
            "q-serve",
            [{"name": "q", "fineTuneJobRef": {"name": "q-job"}}],
            runtime="vllm",
            resources={"gpus": 1},
        ),
    )
    wait_adep(cluster, ns, "q-serve", "Ready")
    args = _server_args(cluster, ns, "q-serve")
    assert args[args.index("--max-lora-rank") + 1] == "128"
    assert "q=/adapters/q" in args


@pytest.mark.parametrize("runtime", ["vllm", "builtin"])
def test_an_output_the_runtime_cannot_serve_is_refused_with_the_reason(
    cluster: ControlPlane, ns: str, runtime: str
) -> None:
    job, adep = f"prefix-{runtime}", f"p-serve-{runtime}"
    apply(cluster, ns, finetunejob(job, pod_labels=HOLD, method={"type": "prefix"}))
    _finish_training(cluster, ns, job, {"adapterUri": "s3://out/p/final/", "method": "prefix"})
    extra = {"runtime": "vllm", "resources": {"gpus": 1}} if runtime == "vllm" else {}
    apply(
        cluster,
        ns,
        adapterdeployment(
            adep,
            [
                {"name": "ok", "source": "s3://adapters/ok/"},
                {"name": "p", "fineTuneJobRef": {"name": job}},
            ],
            **extra,
        ),
    )
    st = wait_adep(cluster, ns, adep, "Degraded")
    cond = next(c for c in st["conditions"] if c["type"] == "AdaptersResolved")
    assert cond["status"] == "False" and cond["reason"] == "UnservableAdapter"
    assert f"FineTuneJob {job} trained a prefix adapter" in cond["message"]
    assert f"runtime {runtime} cannot serve" in cond["message"] and "method lora or qlora" in cond["message"]
    p = next(a for a in st["adapters"] if a["name"] == "p")
    assert p["ready"] is False and "uri" not in p and p["message"] == cond["message"]
    # The servable adapter is still served, the refused one is not handed to the server.
    cm = get(cluster, ns, "configmap", f"{adep}-adapters")
    assert cm is not None and "s3://adapters/ok/" in cm["data"]["adapters.json"]
    assert "s3://out/p/final/" not in cm["data"]["adapters.json"]
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert any(
        e["reason"] == "Degraded" and e["type"] == "Warning"
        for e in events
        if e["involvedObject"].get("name") == adep
    )
