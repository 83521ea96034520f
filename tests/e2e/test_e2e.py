"""End to end: kubectl apply a FineTuneJob -> real training process -> S3 -> AdapterDeployment -> openai client.

The control plane, the operator and SeaweedFS are real; kwok holds the trainer and server pods
Running and the KubeletHarness runs their operator-generated commands as local processes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer.quickstart import CODEBOOK
from tests.conftest import eventually
from tests.e2e.harness import KubeletHarness
from tests.integration.operator_support import get, install_crds, pods, status, wait_phase
from tests.testground.cluster import ControlPlane
from tests.testground.operator import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

HOLD = {"kwok.kubetune.io/outcome": "hold"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny_model import make_tiny_model

    # The quickstart's init range: the tiny model learns a small task in seconds with it.
    return Path(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.1))


@pytest.fixture
def world(
    cluster: ControlPlane, namespace: str, s3, s3_bucket: str, tiny_model: Path, tmp_path: Path
) -> Iterator[dict]:
    """S3 with the base model and the data, the credentials Secret, the operator, the harness."""
    install_crds(cluster)
    c = s3.client()
    for f in tiny_model.iterdir():
        c.upload_file(str(f), s3_bucket, f"models/tiny/{f.name}")
    # Twelve colour -> code-word pairs: after training, the adapter answers them greedily.
    rows = [{"prompt": f"Code for {c}:", "completion": f" {w}"} for c, w in CODEBOOK.items()]
    c.put_object(
        Bucket=s3_bucket, Key="data/train.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode()
    )
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials",
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
        namespace=namespace,
    )  # fmt: skip
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator", namespaces=[namespace], resync_seconds=5
    ).start()
    harness = KubeletHarness(cluster, tmp_path)
    try:
        yield {"ns": namespace, "bucket": s3_bucket, "s3": s3, "harness": harness, "operator": op}
    finally:
        harness.stop_all()
        op.stop()


def finetunejob(world: dict, name: str, max_steps: int, every: int) -> dict:
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
            "resources": {"nodes": 1, "gpusPerNode": 0},
            "distributed": {"strategy": "ddp"},
            "checkpointing": {"everySteps": every, "keepLast": 2},
            "storage": {
                "uri": f"s3://{b}/runs",
                "endpoint": world["s3"].endpoint,
                "secretRef": {"name": "s3-credentials"},
            },
            "podMetadata": {"labels": HOLD},
        },
    }


def running_pod(cluster: ControlPlane, ns: str, selector: str) -> str:
    def check():
        ps = [p for p in pods(cluster, ns, selector) if p["status"].get("phase") == "Running"]
        return ps[0]["metadata"]["name"] if ps else None

    return eventually(check, timeout=60, what=f"a running pod for {selector}")


def test_apply_train_serve_and_chat(cluster: ControlPlane, world: dict) -> None:
    ns, harness = world["ns"], world["harness"]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(finetunejob(world, "codewords", 120, 40)), namespace=ns
    )
    pod = running_pod(cluster, ns, "kubetune.io/finetunejob=codewords")
    harness.run_pod(ns, pod)
    code = harness.wait_and_report(pod, timeout=400)
    assert code == 0, harness.processes[pod].output()[-4000:]
    st = wait_phase(cluster, ns, "codewords", "Succeeded")
    uid = get(cluster, ns, "finetunejob", "codewords")["metadata"]["uid"]
    root = f"s3://{world['bucket']}/runs/{ns}/codewords/{uid}/"
    assert st["output"]["adapterUri"] == root + "final/"
    assert st["output"]["trainableParameters"] > 0
    assert st["output"]["totalParameters"] >= st["output"]["trainableParameters"]
    assert st["progress"]["step"] == 120 and st["progress"]["totalSteps"] == 120
    assert st["checkpoint"]["step"] == 120
    keys = {
        o["Key"]
        for o in world["s3"]
        .client()
        .list_objects_v2(Bucket=world["bucket"], Prefix=f"runs/{ns}/")["Contents"]
    }
    assert f"runs/{ns}/codewords/{uid}/final/adapter_model.safetensors" in keys

    # Serve it: the AdapterDeployment resolves the adapter from the job's status.
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "codewords-server"},
        "spec": {
            "baseModel": {"uri": f"s3://{world['bucket']}/models/tiny/", "servedName": "tiny"},
            "adapters": [{"name": "codewords", "fineTuneJobRef": {"name": "codewords"}}],
            "storage": {"endpoint": world["s3"].endpoint, "secretRef": {"name": "s3-credentials"}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(adep), namespace=ns)

    def resolved_pod():
        deployment = get(cluster, ns, "deployment", "codewords-server")
        if not deployment or deployment["status"].get("updatedReplicas") != 1:
            return None
        cm = get(cluster, ns, "configmap", "codewords-server-adapters") or {}
        if root + "final/" not in cm.get("data", {}).get("adapters.json", ""):
            return None
        return running_pod(cluster, ns, "kubetune.io/adapterdeployment=codewords-server")

    server_pod = eventually(resolved_pod, timeout=60, what="the server pod with the resolved adapter")
    port = harness.run_pod(ns, server_pod).ports[8000]
    import httpx

    def ready():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    eventually(
        ready,
        timeout=120,
        interval=1,
        what=f"the server to be ready: {harness.processes[server_pod].output()[-2000:]}",
    )
    from openai import OpenAI

    api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert {m.id for m in api.models.list().data} >= {"tiny", "codewords"}
    for colour in ("red", "gold"):
        answer = api.completions.create(
            model="codewords", prompt=f"Code for {colour}:", max_tokens=3, temperature=0
        )
        assert answer.model == "codewords"
        assert answer.choices[0].text.split()[:1] == [CODEBOOK[colour]], answer
    base = api.completions.create(model="tiny", prompt="Code for red:", max_tokens=3, temperature=0)
    assert base.choices[0].text.split()[:1] != ["apple"], "the base model should not know the code words"
    st = eventually(
        lambda: (
            (s := (get(cluster, ns, "adapterdeployment", "codewords-server") or {}).get("status") or {}).get(
                "phase"
            )
            == "Ready"
            and s
        ),
        timeout=60,
        what="the AdapterDeployment to be Ready",
    )
    assert st["adapters"] == [
        {"name": "codewords", "uri": root + "final/", "ready": True, "message": "served"}
    ]


def test_a_killed_trainer_resumes_from_its_checkpoint(cluster: ControlPlane, world: dict) -> None:
    ns, harness = world["ns"], world["harness"]
    total = 240  # long enough that the kill lands mid-run, well before the last step
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(finetunejob(world, "crashy", total, 20)), namespace=ns
    )
    pod = running_pod(cluster, ns, "kubetune.io/finetunejob=crashy,kubetune.io/attempt=1")
    harness.run_pod(ns, pod)

    def checkpointed():
        st = status(cluster, ns, "crashy")
        return (st.get("checkpoint") or {}).get("step")

    first = eventually(checkpointed, timeout=300, interval=0.5, what="a first checkpoint in S3")
    harness.kill(pod)
    code = harness.wait_and_report(pod, timeout=30)
    assert code == 137
    # The operator starts attempt 2; its trainer resumes from the newest complete checkpoint.
    pod2 = running_pod(cluster, ns, "kubetune.io/finetunejob=crashy,kubetune.io/attempt=2")
    assert status(cluster, ns, "crashy")["attempt"] == 2
    harness.run_pod(ns, pod2)
    code = harness.wait_and_report(pod2, timeout=400)
    out = harness.processes[pod2].output()
    assert code == 0, out[-4000:]
    resumed = re.search(r"resuming from checkpoint \S+checkpoint-(\d+) \(step (\d+)\)", out)
    assert resumed, out[-4000:]
    assert first <= int(resumed.group(2)) < total, (first, resumed.group(0))
    st = wait_phase(cluster, ns, "crashy", "Succeeded")
    assert st["progress"]["step"] == total
    events = json.loads(cluster.kubectl("get", "events", "-o", "json", namespace=ns).stdout)["items"]
    assert any(e["reason"] == "Restarting" and e["involvedObject"]["name"] == "crashy" for e in events)
