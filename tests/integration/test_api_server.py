"""The API on the real kube-apiserver: examples accepted, mistakes rejected with messages that
teach, immutable fields enforced, defaults applied as the client-side loader applies them.

No operator runs here: every behaviour below is the API server's own, driven by the generated
CRDs. What users see through kubectl (explain, columns, names, status) is test_api_kubectl.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune_operator.api import load_adapterdeployment, load_finetunejob, load_finetunesweep
from tests.testground.cluster import REPO, ControlPlane
from tests.unit.test_api_cases import (
    ACCEPTED,
    ACCEPTED_SWEEPS,
    INVALID,
    Case,
    accepted,
    accepted_sweep,
    adapterdeployment,
    client_error,
    finetunejob,
)

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kubetune.io", "v1alpha1"
PLURALS = {
    "FineTuneJob": "finetunejobs",
    "AdapterDeployment": "adapterdeployments",
    "FineTuneSweep": "finetunesweeps",
}
LOADERS = {
    "FineTuneJob": load_finetunejob,
    "AdapterDeployment": load_adapterdeployment,
    "FineTuneSweep": load_finetunesweep,
}
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def api_ns(cluster: ControlPlane, kubetune_crds: list[Path]) -> Iterator[str]:
    """One namespace for the whole module: dry-run requests leave nothing behind in it."""
    name = f"api-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def custom(cluster: ControlPlane) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client())


def server_error(custom: client.CustomObjectsApi, ns: str, obj: dict[str, Any]) -> str:
    """The API server's message for a dry-run create (what kubectl would print)."""
    with pytest.raises(ApiException) as info:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURALS[obj["kind"]], obj, dry_run="All", field_validation="Strict"
        )
    assert info.value.status in (400, 422), info.value
    return json.loads(info.value.body or "{}")["message"]


# ---- examples ------------------------------------------------------------------------------------


def test_there_are_examples_for_both_kinds() -> None:
    kinds = {d["kind"] for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d}
    assert {"FineTuneJob", "AdapterDeployment"} <= kinds, kinds


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_defaulted_like_the_client_and_drift_free(
    cluster: ControlPlane, api_ns: str, path: Path
) -> None:
    res = cluster.kubectl(
        "apply", "--server-side", "-f", str(path), "-o", "json", namespace=api_ns, check=False
    )
    assert res.returncode == 0, f"{path.name} rejected by the API server:\n{res.stderr}"
    out = json.loads(res.stdout)
    created = {(o["kind"], o["metadata"]["name"]): o for o in out.get("items", [out])}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") in LOADERS:
            # The client-side loader accepts it too (or raises InvalidManifestError naming the field),
            # and fills in exactly the API server's defaults.
            client_spec = LOADERS[doc["kind"]](doc).to_manifest()["spec"]
            assert created[(doc["kind"], doc["metadata"]["name"])]["spec"] == client_spec
    # Applying the same file again changes nothing (what Argo CD / Flux compare).
    diff = cluster.kubectl("diff", "--server-side", "-f", str(path), namespace=api_ns, check=False)
    assert diff.returncode == 0, (
        f"re-applying {path.name} would change the object:\n{diff.stdout}{diff.stderr}"
    )


# ---- invalid manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_manifest_is_rejected_naming_field_and_fix(
    custom: client.CustomObjectsApi, api_ns: str, case: Case
) -> None:
    message = server_error(custom, api_ns, case.manifest())
    assert case.path in message, f"the error does not name {case.path}: {message}"
    assert (case.server or case.fix) in message, f"the error does not say how to fix it: {message}"
    # The client-side loader (kubetune run --local, the operator) rejects it the same way.
    client_message = client_error(case)
    if case.server is None and case.client is None:
        assert case.fix in client_message


@pytest.mark.parametrize(("id_", "patch"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_near_misses_are_accepted(
    custom: client.CustomObjectsApi, api_ns: str, id_: str, patch: dict
) -> None:
    """Right beside a rule's edge: the API server accepts what the client accepts (tests/unit)."""
    custom.create_namespaced_custom_object(
        GROUP, VERSION, api_ns, "finetunejobs", accepted(patch), dry_run="All", field_validation="Strict"
    )


@pytest.mark.parametrize(("id_", "patch"), ACCEPTED_SWEEPS, ids=[a[0] for a in ACCEPTED_SWEEPS])
def test_sweep_near_misses_are_accepted(
    custom: client.CustomObjectsApi, api_ns: str, id_: str, patch: dict
) -> None:
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        api_ns,
        "finetunesweeps",
        accepted_sweep(patch),
        dry_run="All",
        field_validation="Strict",
    )


def test_kubectl_prints_the_teaching_message(cluster: ControlPlane, api_ns: str) -> None:
    case = next(c for c in INVALID if c.id == "lora-block-with-full")
    res = cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(case.manifest()), namespace=api_ns, check=False
    )
    assert res.returncode != 0
    assert "spec.method.lora" in res.stderr and case.fix in res.stderr, res.stderr


# ---- updates -------------------------------------------------------------------------------------

IMMUTABLE = [
    ("method", {"method": {"type": "full"}}, "spec.method is immutable: create a new FineTuneJob to change the method"),
    ("method-params", {"method": {"lora": {"r": 32}}}, "spec.method is immutable"),
    ("base-model", {"baseModel": {"uri": "hf://Qwen/Qwen2.5-1.5B"}}, "spec.baseModel is immutable: create a new FineTuneJob"),
    ("dataset", {"dataset": {"maxSeqLength": 4096}}, "spec.dataset is immutable: create a new FineTuneJob"),
    ("dataset-uri", {"dataset": {"train": {"uri": "s3://data/other.jsonl"}}}, "spec.dataset is immutable"),
    ("dataset-split", {"dataset": {"validationSplit": 0.2}}, "spec.dataset is immutable"),
    ("storage-uri", {"storage": {"uri": "s3://elsewhere"}}, "spec.storage.uri is immutable"),
    ("nodes", {"resources": {"nodes": 2}}, "spec.resources.nodes is immutable: the training Job is sized for it"),
    ("gpus-per-node", {"resources": {"gpusPerNode": 2}}, "spec.resources.gpusPerNode is immutable"),
    ("gpus-to-cpu", {"resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode is immutable"),
]  # fmt: skip


@pytest.fixture(scope="module")
def existing_job(cluster: ControlPlane, api_ns: str) -> str:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunejob("immutable")), namespace=api_ns)
    return "immutable"


@pytest.mark.parametrize(("field", "patch", "message"), IMMUTABLE, ids=[i[0] for i in IMMUTABLE])
def test_immutable_fields_cannot_change(
    cluster: ControlPlane, api_ns: str, existing_job: str, field: str, patch: dict, message: str
) -> None:
    res = cluster.kubectl(
        "patch", "finetunejob", existing_job, "--type=merge", "-p", json.dumps({"spec": patch}),
        namespace=api_ns, check=False,
    )  # fmt: skip
    assert res.returncode != 0, f"changing spec.{field} was accepted"
    assert message in res.stderr and "create a new FineTuneJob" in res.stderr, res.stderr


def test_mutable_fields_can_change(cluster: ControlPlane, api_ns: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunejob("mutable")), namespace=api_ns)
    before = json.loads(cluster.kubectl("get", "ftj", "mutable", "-o", "json", namespace=api_ns).stdout)
    for patch in (
        {"runPolicy": {"suspend": True}, "hyperparameters": {"epochs": 1}, "resources": {"cpu": "8"}},
        {"runPolicy": {"maxRestarts": 5, "suspend": False}},
        {"hyperparameters": {"learningRate": 0.0001}},
    ):
        cluster.kubectl(
            "patch", "ftj", "mutable", "--type=merge", "-p", json.dumps({"spec": patch}), namespace=api_ns
        )
    after = json.loads(cluster.kubectl("get", "ftj", "mutable", "-o", "json", namespace=api_ns).stdout)
    assert after["spec"]["runPolicy"] == {"maxRestarts": 5, "suspend": False}
    assert after["spec"]["resources"]["cpu"] == "8" and after["spec"]["hyperparameters"]["epochs"] == 1
    assert after["spec"]["hyperparameters"]["learningRate"] == 0.0001
    assert after["spec"]["method"] == before["spec"]["method"] == {"type": "lora"}
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 3


def test_reapplying_the_same_manifest_is_a_no_op(cluster: ControlPlane, api_ns: str) -> None:
    """GitOps: applying the unchanged manifest again changes nothing (no drift, no immutability error)."""
    manifest = json.dumps(finetunejob("reapply"))
    cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest, namespace=api_ns)
    before = json.loads(cluster.kubectl("get", "ftj", "reapply", "-o", "json", namespace=api_ns).stdout)
    cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest, namespace=api_ns)
    after = json.loads(cluster.kubectl("get", "ftj", "reapply", "-o", "json", namespace=api_ns).stdout)
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


# ---- defaults ------------------------------------------------------------------------------------


def created_spec(cluster: ControlPlane, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), namespace=ns)
    kind, name = obj["kind"].lower(), obj["metadata"]["name"]
    return json.loads(cluster.kubectl("get", kind, name, "-o", "json", namespace=ns).stdout)["spec"]


def test_finetunejob_defaults_are_applied_as_documented(cluster: ControlPlane, api_ns: str) -> None:
    manifest = finetunejob("defaults")
    spec = created_spec(cluster, api_ns, manifest)
    assert spec["method"] == {"type": "lora"}
    assert spec["hyperparameters"] == {
        "epochs": 3, "learningRate": 2e-4, "batchSizePerDevice": 4, "gradientAccumulationSteps": 1,
        "warmupRatio": 0, "warmupSteps": 0, "scheduler": "linear", "weightDecay": 0, "maxGradNorm": 1,
        "precision": "auto", "seed": 42, "gradientCheckpointing": False,
    }  # fmt: skip
    assert spec["resources"] == {"nodes": 1, "gpusPerNode": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert spec["evaluation"] == {"metrics": ["perplexity"], "strategy": "auto"}
    assert spec["distributed"] == {"strategy": "deepspeed"}
    assert spec["checkpointing"] == {"keepLast": 3, "resume": "auto"}
    assert spec["runPolicy"] == {"maxRestarts": 3, "suspend": False}
    assert spec["baseModel"] == {"uri": "hf://Qwen/Qwen2.5-0.5B", "dtype": "auto", "trustRemoteCode": False}
    assert spec["dataset"]["train"]["format"] == "auto" and spec["dataset"]["maxSeqLength"] == 1024
    assert spec["dataset"]["dedupe"] == "exact"
    assert "packing" not in spec["dataset"]  # unset: the trainer picks the faster layout (packing auto)
    assert spec["storage"]["secretRef"] == {
        "name": "s3-credentials", "accessKeyIdKey": "AWS_ACCESS_KEY_ID", "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
    }  # fmt: skip
    # The client-side loader fills in exactly the same defaults.
    assert load_finetunejob(manifest).to_manifest()["spec"] == spec


def test_nested_block_defaults_are_applied(cluster: ControlPlane, api_ns: str) -> None:
    """A block written with one field (or none) gets the rest of its defaults."""
    manifest = finetunejob("nested-defaults")
    manifest["spec"]["method"] = {"type": "qlora", "qlora": {"r": 32}}
    manifest["spec"]["distributed"] = {"deepspeed": {"offload": "optimizer"}}
    manifest["spec"]["dataset"]["replay"] = {"uri": "s3://data/old.jsonl"}
    manifest["spec"]["dataset"]["validationSplit"] = 0.1
    manifest["spec"]["evaluation"] = {"earlyStopping": {"patience": 5}}
    spec = created_spec(cluster, api_ns, manifest)
    assert spec["method"]["qlora"] == {
        "r": 32, "alpha": 16, "dropout": 0.05, "bias": "none", "useRslora": False, "bits": 4, "quantType": "nf4",
        "doubleQuant": True, "computeDtype": "auto",
    }  # fmt: skip
    assert spec["distributed"]["deepspeed"] == {"zeroStage": 2, "offload": "optimizer"}
    assert spec["dataset"]["replay"] == {"uri": "s3://data/old.jsonl", "fraction": 0.1, "ewcLambda": 0}
    assert spec["evaluation"]["earlyStopping"] == {"metric": "eval_loss", "patience": 5, "threshold": 0}
    assert load_finetunejob(manifest).to_manifest()["spec"] == spec


def test_adapterdeployment_defaults_are_applied_as_documented(cluster: ControlPlane, api_ns: str) -> None:
    manifest = adapterdeployment("serve-defaults")
    spec = created_spec(cluster, api_ns, manifest)
    assert spec["runtime"] == "builtin" and spec["hotReload"] is False
    assert spec["service"] == {"port": 8000, "type": "ClusterIP"}
    assert spec["resources"] == {"gpus": 0, "gpuResourceName": "nvidia.com/gpu"}
    assert spec["storage"] == {}
    assert "replicas" not in spec  # 1 unless autoscaling: replicas and autoscaling exclude each other
    assert load_adapterdeployment(manifest).to_manifest()["spec"] == spec
