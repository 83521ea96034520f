"""End to end on real pods: what a user gets after `helm install`, on the test ground's real node.

The chart installs the operator image (pulled from the loopback registry) as a real pod with
exactly the chart's RBAC; FineTuneJobs run in real trainer containers (two pods rendezvous
through the headless Service's DNS name); a pod deleted mid-run (SIGTERM) and a trainer
process killed with SIGKILL each lead to an attempt that resumes from the last complete
checkpoint in S3; an AdapterDeployment with hot reload becomes Ready through its real
readiness probe and answers the official openai client through `kubectl port-forward`, and a
third adapter added to its spec is loaded by the running pod without a rollout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.quickstart import CODEBOOK
from tests.conftest import eventually
from tests.integration.operator_support import get, install_crds, pods, status, wait_phase
from tests.testground.cluster import REPO, ControlPlane, binaries_dir, kubectl_binary
from tests.testground.node import RealNode, scheduling
from tests.testground.procs import free_port
from tests.testground.registry import Registry

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

CHART = REPO / "charts" / "kubetune"


def helm(cluster: ControlPlane, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = [str(binaries_dir() / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny_model import make_tiny_model

    return Path(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.1))


@pytest.fixture(scope="module")
def world(
    cluster: ControlPlane,
    real_node: RealNode,
    registry: Registry,
    s3,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict]:
    """The chart installed with the built images, watching one namespace; a model and data in S3."""
    suffix = uuid.uuid4().hex[:5]
    ns, release_ns = f"e2e-{suffix}", f"kubetune-e2e-{suffix}"
    for name in (ns, release_ns):
        cluster.kubectl("create", "namespace", name)
    install_crds(cluster)  # as other tests may have; helm then keeps the existing CRDs
    bucket = f"e2e-{suffix}"
    c = s3.client()
    c.create_bucket(Bucket=bucket)
    for f in tiny_model.iterdir():
        c.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    rows = [{"prompt": f"Code for {k}:", "completion": f" {v}"} for k, v in CODEBOOK.items()]
    c.put_object(Bucket=bucket, Key="data/train.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials",
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
        namespace=ns,
    )  # fmt: skip
    assert cluster.network is not None
    endpoint = s3.endpoint_at(cluster.network.host_ip)  # where pods reach S3
    place = scheduling()
    values = {
        "operator": {
            "image": {"repository": f"localhost:{registry.port}/kubetune/operator", "pullPolicy": "Always"},
            "watchNamespaces": [ns],
            "resyncSeconds": 5,
            **place,
        },
        "trainer": {
            "image": {"repository": f"localhost:{registry.port}/kubetune/trainer", "pullPolicy": "Always"},
            "terminationGracePeriodSeconds": 120,
        },
        "storage": {"endpoint": endpoint, "secretName": "s3-credentials"},
    }
    values_file = tmp_path_factory.mktemp("helm") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    t0 = time.monotonic()
    # Released as `kubetune`, as docs/operations.md does: a Service kubetune-metrics then exists,
    # whose link env vars once crashed the operator (KUBETUNE_METRICS_PORT=tcp://...).
    helm(
        cluster,
        "install",
        "kubetune",
        str(CHART),
        "-n",
        release_ns,
        "-f",
        str(values_file),
        "--wait",
        "--timeout",
        "300s",
    )
    print(f"\n[e2e] helm install with the operator pod Ready: {time.monotonic() - t0:.1f}s")
    try:
        yield {"ns": ns, "release_ns": release_ns, "bucket": bucket, "s3": s3, "endpoint": endpoint}
    finally:
        operator_log = cluster.kubectl(
            "logs", "deploy/kubetune", "--tail=200", namespace=release_ns, check=False
        ).stdout
        print(f"\n[e2e] operator log (tail):\n{operator_log[-6000:]}")
        subprocess.run(
            [
                str(binaries_dir() / "helm"),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "uninstall",
                "kubetune",
                "-n",
                release_ns,
            ],
            capture_output=True,
            timeout=120,
        )
        for name in (ns, release_ns):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def finetunejob(world: dict, name: str, *, nodes: int, max_steps: int, every: int) -> dict:
    b = world["bucket"]
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": f"s3://{b}/models/tiny/"},
            "dataset": {"train": {"uri": f"s3://{b}/data/train.jsonl"}, "maxSeqLength": 64},
            "method": {
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
            },
            "hyperparameters": {"maxSteps": max_steps, "learningRate": 5e-3, "batchSizePerDevice": 4},
            "resources": {"nodes": nodes, "gpusPerNode": 0, "cpu": "500m", "memory": "3Gi", **scheduling()},
            "distributed": {"strategy": "ddp"},
            "checkpointing": {"everySteps": every, "keepLast": 2},
            # The chart's storage defaults (endpoint, Secret) fill in the rest.
            "storage": {"uri": f"s3://{b}/runs"},
        },
    }


def trainer_pods(cluster: ControlPlane, ns: str, job: str, attempt: int | None = None) -> list[dict]:
    sel = f"kubetune.io/finetunejob={job}" + (f",kubetune.io/attempt={attempt}" if attempt else "")
    return pods(cluster, ns, sel)


def pod_log(cluster: ControlPlane, ns: str, pod: str) -> str:
    return cluster.kubectl("logs", pod, namespace=ns, check=False).stdout


def test_two_trainer_pods_rendezvous_through_dns_and_upload_the_adapter(
    cluster: ControlPlane, world: dict
) -> None:
    ns = world["ns"]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(finetunejob(world, "codewords", nodes=2, max_steps=120, every=40)),
        namespace=ns,
    )  # fmt: skip
    seen_rows: list[str] = []

    def succeeded():
        row = cluster.kubectl("get", "ftj", "codewords", "--no-headers", namespace=ns, check=False).stdout
        seen_rows.append(row.strip())
        st = status(cluster, ns, "codewords")
        if st.get("phase") == "Failed":
            raise AssertionError(f"codewords failed: {json.dumps(st)[:3000]}")
        return st if st.get("phase") == "Succeeded" else None

    # The first run on a node pulls the ~5 GB trainer image from the registry.
    st = eventually(succeeded, timeout=900, interval=2, what="the 2-pod FineTuneJob to succeed")
    # `kubectl get ftj` showed how far along it was while it ran.
    progress = [float(m.group(1)) for r in seen_rows if (m := re.search(r"\bRunning\s+(\d+(?:\.\d+)?)\s", r))]
    assert any(0 < p < 100 for p in progress), seen_rows[-20:]
    ps = trainer_pods(cluster, ns, "codewords")
    assert len(ps) == 2 and {p["spec"]["nodeName"] for p in ps} == {"real-node-0"}
    assert all(p["status"]["phase"] == "Succeeded" for p in ps), [p["status"] for p in ps]
    # Both ranks took part: worker 1 reached pod 0 by its DNS name, before pod 0 was Ready.
    worker = next(
        p for p in ps if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    )
    command = " ".join(worker["spec"]["containers"][0]["command"])
    assert re.search(r"codewords-\S*-0\.\S+\.svc", command), command
    uid = get(cluster, ns, "finetunejob", "codewords")["metadata"]["uid"]
    root = f"s3://{world['bucket']}/runs/{ns}/codewords/{uid}/"
    assert st["output"]["adapterUri"] == root + "final/"
    assert st["progress"]["step"] == 120
    assert st["checkpoint"]["step"] == 120
    keys = {
        o["Key"]
        for o in world["s3"]
        .client()
        .list_objects_v2(Bucket=world["bucket"], Prefix=f"runs/{ns}/")["Contents"]
    }
    assert f"runs/{ns}/codewords/{uid}/final/adapter_model.safetensors" in keys
    assert any("/checkpoints/checkpoint-120/" in k for k in keys), sorted(keys)[:20]
    # The operator pod's log says what it did, not every kubelet probe.
    operator_log = cluster.kubectl("logs", "deploy/kubetune", namespace=world["release_ns"]).stdout
    assert "codewords: Running -> Succeeded" in operator_log and "kube-probe" not in operator_log


def container_pid(node: RealNode, pod: dict) -> int:
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    info = json.loads(node.crictl("inspect", cid).stdout)
    return int(info["info"]["pid"])


def test_sigterm_and_sigkill_each_resume_from_the_last_checkpoint(
    cluster: ControlPlane, real_node: RealNode, world: dict
) -> None:
    ns, total = world["ns"], 1000
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(finetunejob(world, "crashy", nodes=1, max_steps=total, every=50)),
        namespace=ns,
    )  # fmt: skip

    def checkpoint_in(attempt: int, above: int) -> int | None:
        st = status(cluster, ns, "crashy")
        step = (st.get("checkpoint") or {}).get("step")
        return step if st.get("attempt") == attempt and step and step > above else None

    first = eventually(lambda: checkpoint_in(1, 0), timeout=600, interval=0.5, what="a first checkpoint")
    # 1. Preemption: the pod is deleted, the kubelet sends SIGTERM, the trainer saves within the grace period.
    pod1 = trainer_pods(cluster, ns, "crashy", 1)[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", pod1, "--wait=true", namespace=ns, timeout=180)
    pod2 = eventually(
        lambda: next(
            (p for p in trainer_pods(cluster, ns, "crashy", 2) if p["status"].get("phase") == "Running"), None
        ),
        timeout=180,
        what="attempt 2's pod to run",
    )
    log1 = pod_log(cluster, ns, pod1)  # gone with its pod; the resume line below is the evidence

    def resumed_step(pod: str) -> int | None:
        m = re.search(
            r"resuming from checkpoint \S+checkpoint-(\d+) \(step (\d+)\)", pod_log(cluster, ns, pod)
        )
        return int(m.group(2)) if m else None

    step2 = eventually(
        lambda: resumed_step(pod2["metadata"]["name"]), timeout=300, what="attempt 2 to resume"
    )
    assert first <= step2 < total, (first, step2, log1[-2000:])
    # The checkpoint taken on SIGTERM is the newest one when attempt 2 starts.
    assert status(cluster, ns, "crashy")["attempt"] == 2

    # 2. A crash: SIGKILL the training process tree's root inside the container.
    last = eventually(
        lambda: checkpoint_in(2, step2), timeout=600, interval=0.5, what="a checkpoint in attempt 2"
    )
    pod2 = trainer_pods(cluster, ns, "crashy", 2)[0]
    os.kill(container_pid(real_node, pod2), signal.SIGKILL)
    pod3 = eventually(
        lambda: next(
            (p for p in trainer_pods(cluster, ns, "crashy", 3) if p["status"].get("phase") == "Running"), None
        ),
        timeout=180,
        what="attempt 3's pod to run",
    )
    killed = get(cluster, ns, "pod", pod2["metadata"]["name"])
    assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    step3 = eventually(
        lambda: resumed_step(pod3["metadata"]["name"]), timeout=300, what="attempt 3 to resume"
    )
    assert last <= step3 < total
    st = wait_phase(cluster, ns, "crashy", "Succeeded", timeout=900)
    assert st["progress"]["step"] == total and st["attempt"] == 3
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert sum(e["reason"] == "Restarting" and e["involvedObject"]["name"] == "crashy" for e in events) >= 2


@contextlib.contextmanager
def port_forward(cluster: ControlPlane, ns: str, target: str, port: int) -> Iterator[int]:
    local = free_port()
    proc = subprocess.Popen(
        [
            kubectl_binary(),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            ns,
            "port-forward",
            target,
            f"{local}:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"kubectl port-forward exited: {proc.stdout.read() if proc.stdout else ''}"
                )
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", local)) == 0

        eventually(listening, timeout=30, what=f"port-forward to {target}")
        yield local
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_hot_reload_server_ready_by_probe_and_answers_each_adapter_through_port_forward(
    cluster: ControlPlane, world: dict
) -> None:
    ns, b = world["ns"], world["bucket"]
    st = wait_phase(cluster, ns, "codewords", "Succeeded", timeout=60)  # the first test trained it
    # A second copy of the adapter, named by its S3 location rather than by the job.
    c = world["s3"].client()
    final = st["output"]["adapterUri"].removeprefix(f"s3://{b}/")
    for o in c.list_objects_v2(Bucket=b, Prefix=final)["Contents"]:
        c.copy_object(
            Bucket=b, Key="adapters/copy/" + o["Key"][len(final) :], CopySource={"Bucket": b, "Key": o["Key"]}
        )
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "codewords-server"},
        "spec": {
            "baseModel": {"uri": f"s3://{b}/models/tiny/", "servedName": "tiny"},
            "adapters": [
                {"name": "from-job", "fineTuneJobRef": {"name": "codewords"}},
                {"name": "from-s3", "source": f"s3://{b}/adapters/copy/"},
            ],
            "hotReload": True,
            "resources": {"cpu": "500m", "memory": "3Gi"},
            **scheduling(),
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(adep), namespace=ns)
    observed: list[tuple[str | None, bool]] = []

    def ready():
        ad = get(cluster, ns, "adapterdeployment", "codewords-server") or {}
        phase = (ad.get("status") or {}).get("phase")
        server = pods(cluster, ns, "kubetune.io/adapterdeployment=codewords-server")
        pod_ready = bool(server) and any(
            c["type"] == "Ready" and c["status"] == "True" for c in server[0]["status"].get("conditions", [])
        )
        observed.append((phase, pod_ready))
        return server[0] if phase == "Ready" else None

    pod = eventually(ready, timeout=600, interval=0.5, what="the AdapterDeployment to be Ready")
    # Ready only once the kubelet's readiness probe passed; never before.
    assert all(pod_ready for phase, pod_ready in observed if phase == "Ready"), observed
    probe = pod["spec"]["containers"][0].get("readinessProbe")
    assert probe and probe.get("httpGet"), pod["spec"]["containers"][0]
    replicasets = {
        r["metadata"]["name"]
        for r in json.loads(cluster.kubectl("get", "rs", "-o", "json", namespace=ns).stdout)["items"]
    }

    from openai import OpenAI

    with port_forward(cluster, ns, "svc/codewords-server", 8000) as local:
        api = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused")
        assert {m.id for m in api.models.list().data} >= {"tiny", "from-job", "from-s3"}
        for model in ("from-job", "from-s3"):
            for colour in ("red", "gold"):
                answer = api.completions.create(
                    model=model, prompt=f"Code for {colour}:", max_tokens=3, temperature=0
                )
                assert answer.model == model
                assert answer.choices[0].text.split()[:1] == [CODEBOOK[colour]], answer

        # A third adapter: the running pod loads it, no rollout.
        cluster.kubectl(
            "patch", "adapterdeployment", "codewords-server", "--type=json",
            "-p", json.dumps([{"op": "add", "path": "/spec/adapters/-", "value": {"name": "third", "source": f"s3://{b}/adapters/copy/"}}]),
            namespace=ns,
        )  # fmt: skip

        def third_served() -> bool:
            return "third" in {m.id for m in api.models.list().data}

        eventually(
            third_served, timeout=180, interval=1, what="the third adapter to be loaded by the running pod"
        )
        answer = api.completions.create(model="third", prompt="Code for red:", max_tokens=3, temperature=0)
        assert answer.choices[0].text.split()[:1] == [CODEBOOK["red"]]
    now = pods(cluster, ns, "kubetune.io/adapterdeployment=codewords-server")
    assert [p["metadata"]["uid"] for p in now] == [pod["metadata"]["uid"]]
    assert all(cs["restartCount"] == 0 for cs in now[0]["status"]["containerStatuses"])
    after = {
        r["metadata"]["name"]
        for r in json.loads(cluster.kubectl("get", "rs", "-o", "json", namespace=ns).stdout)["items"]
    }
    assert after == replicasets
