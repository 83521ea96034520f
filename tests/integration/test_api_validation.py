"""The API on a real kube-apiserver: what users meet with kubectl apply, explain and get.

No operator runs here: every behaviour below is the API server's own, driven by the generated
CRDs (validation, CEL rules, defaulting, status subresource, printer columns, explain). Each
invalid manifest also goes through the client-side loader, which must reject it too.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api import InvalidManifestError, load_adapterdeployment, load_finetunejob
from tests.conftest import eventually
from tests.integration.operator_support import install_crds
from tests.testground.cluster import REPO, ControlPlane

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
LOADERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "FineTuneJob": load_finetunejob,
    "AdapterDeployment": load_adapterdeployment,
}


@pytest.fixture(scope="module")
def crds(cluster: ControlPlane) -> ControlPlane:
    install_crds(cluster)
    return cluster


@pytest.fixture
def ns(crds: ControlPlane, namespace: str) -> str:
    return namespace


def read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def kubectl_json(cluster: ControlPlane, *args: str, namespace: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json", namespace=namespace).stdout)


def crd_messages() -> set[str]:
    """Every CEL message in the CRDs: the texts the client mirror must print as well."""
    out: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations") or []:
                out.add(rule["message"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (REPO / "crds").glob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return out


# ---- every example is accepted, defaulted like the client does, and stable -------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_accepted_defaulted_and_drift_free(crds: ControlPlane, ns: str, path: Path) -> None:
    created = kubectl_json(crds, "apply", "--server-side", "-f", str(path), namespace=ns)
    manifest = read(path)
    client = LOADERS[manifest["kind"]](manifest).to_manifest()
    # The API server's defaults are exactly the client-side loader's.
    assert created["spec"] == client["spec"]
    # Applying the same file again changes nothing (what Argo CD / Flux compare).
    diff = crds.kubectl("diff", "--server-side", "-f", str(path), namespace=ns, check=False)
    assert diff.returncode == 0, (
        f"re-applying {path.name} would change the object:\n{diff.stdout}{diff.stderr}"
    )


# ---- invalid manifests ------------------------------------------------------------------------------

FTJ_BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bad"},
    "spec": {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": {"uri": "s3://datasets/train.jsonl"}},
        "storage": {"uri": "s3://kubetune/runs", "secretRef": {"name": "s3-credentials"}},
    },
}
ADEP_BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "AdapterDeployment",
    "metadata": {"name": "bad"},
    "spec": {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
        "adapters": [{"name": "support", "source": "s3://adapters/support/"}],
    },
}


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """base with patch deep-merged in; None deletes a key (like a JSON merge patch)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Bad:
    id: str
    spec: dict[str, Any]  # merged into the base spec
    field: str  # the field the error must name
    fix: str  # what the message must say (the fix, the bound, or the allowed values)
    kind: str = "FineTuneJob"
    extra: tuple[str, ...] = field(default=())  # more text the server's message must contain

    def manifest(self) -> dict[str, Any]:
        base = FTJ_BASE if self.kind == "FineTuneJob" else ADEP_BASE
        return merged(base, {"spec": self.spec})


VALID_SPLIT = {"validationSplit": 0.1}
A = "AdapterDeployment"

INVALID = [
    # bounds
    Bad("learning-rate-0", {"hyperparameters": {"learningRate": 0}}, "spec.hyperparameters.learningRate", "should be greater than 0"),
    Bad("validation-split-0.7", {"dataset": {"validationSplit": 0.7}}, "spec.dataset.validationSplit", "less than or equal to 0.5"),
    Bad("validation-split-0", {"dataset": {"validationSplit": 0}}, "spec.dataset.validationSplit", "should be greater than 0"),
    Bad("gpus-per-node-17", {"resources": {"gpusPerNode": 17}}, "spec.resources.gpusPerNode", "less than or equal to 16"),
    Bad("nodes-0", {"resources": {"nodes": 0}}, "spec.resources.nodes", "greater than or equal to 1"),
    Bad("zero-stage-4", {"distributed": {"deepspeed": {"zeroStage": 4}}}, "spec.distributed.deepspeed.zeroStage", "less than or equal to 3"),
    Bad("negative-max-restarts", {"runPolicy": {"maxRestarts": -1}}, "spec.runPolicy.maxRestarts", "greater than or equal to 0"),
    Bad("epochs-0", {"hyperparameters": {"epochs": 0}}, "spec.hyperparameters.epochs", "should be greater than 0"),
    Bad("lora-rank-0", {"method": {"lora": {"r": 0}}}, "spec.method.lora.r", "greater than or equal to 1"),
    Bad("lora-dropout-1", {"method": {"lora": {"dropout": 1}}}, "spec.method.lora.dropout", "should be less than 1"),
    Bad("mixture-weight-0", {"dataset": {"train": None, "mixture": [{"uri": "s3://d/a.jsonl", "weight": 0}]}}, "spec.dataset.mixture[0].weight", "should be greater than 0"),
    Bad("replay-fraction-1", {"dataset": {"replay": {"uri": "s3://d/old.jsonl", "fraction": 1}}}, "spec.dataset.replay.fraction", "should be less than 1"),
    Bad("max-seq-length-4", {"dataset": {"maxSeqLength": 4}}, "spec.dataset.maxSeqLength", "greater than or equal to 8"),
    # types and enums
    Bad("learning-rate-string", {"hyperparameters": {"learningRate": "2e-4"}}, "spec.hyperparameters.learningRate", "must be of type number"),
    Bad("method-type-enum", {"method": {"type": "adalora"}}, "spec.method.type", 'supported values: "lora", "qlora", "full", "prefix", "prompt", "ptuning"'),
    Bad("data-format-enum", {"dataset": {"train": {"format": "sharegpt"}}}, "spec.dataset.train.format", 'supported values: "auto", "text", "instruction", "chat", "completion"'),
    Bad("metric-enum", {"evaluation": {"metrics": ["bleurt"]}}, "spec.evaluation.metrics[0]", 'Unsupported value: "bleurt"', extra=('"bleu"',)),
    Bad("qlora-bits-3", {"method": {"type": "qlora", "qlora": {"bits": 3}}}, "spec.method.qlora.bits", 'supported values: "4", "8"'),
    # formats (CEL rules with a message instead of a printed regex)
    Bad("storage-uri-gs", {"storage": {"uri": "gs://x"}}, "spec.storage.uri", "s3://bucket or s3://bucket/prefix"),
    Bad("base-model-scheme", {"baseModel": {"uri": "ftp://models/x"}}, "spec.baseModel.uri", "hf://org/name, s3://bucket/path"),
    Bad("data-uri-with-space", {"dataset": {"train": {"uri": "s3://d/my data.jsonl"}}}, "spec.dataset.train.uri", "s3://bucket/key"),
    Bad("quantity-16GB", {"resources": {"memory": "16GB"}}, "spec.resources.memory", "quantity such as 4, 500m or 64Gi"),
    Bad("endpoint-without-scheme", {"storage": {"endpoint": "minio:9000"}}, "spec.storage.endpoint", "http:// or https:// URL"),
    Bad("secret-name-not-dns", {"storage": {"secretRef": {"name": "S3_Creds"}}}, "spec.storage.secretRef.name", "lowercase DNS subdomain"),
    # structure
    Bad("unknown-field", {"hyperparameter": {"learningRate": 0.001}}, "spec.hyperparameter", 'unknown field "spec.hyperparameter"'),
    Bad("missing-storage", {"storage": None}, "spec.storage", "Required value"),
    Bad("missing-train-and-mixture", {"dataset": {"train": None}}, "spec.dataset", "set dataset.train.uri, or dataset.mixture"),
    Bad("empty-mixture", {"dataset": {"train": None, "mixture": []}}, "spec.dataset", "set dataset.train.uri, or dataset.mixture"),
    # cross-field rules
    Bad("validation-and-split", {"dataset": {"validation": {"uri": "s3://d/v.jsonl"}, **VALID_SPLIT}}, "spec.dataset.validationSplit", "set dataset.validation or dataset.validationSplit, not both"),
    Bad("lora-block-with-prefix", {"method": {"type": "prefix", "lora": {"r": 8}}}, "spec.method.lora", "remove method.lora or set method.type to lora"),
    Bad("prompt-block-with-ptuning", {"method": {"type": "ptuning", "prompt": {"numVirtualTokens": 8}}}, "spec.method.prompt", "remove method.prompt or set method.type to prompt"),
    Bad("qlora-without-gpus", {"method": {"type": "qlora"}, "resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode", "set resources.gpusPerNode >= 1"),
    Bad("qlora-with-zero3", {"method": {"type": "qlora"}, "distributed": {"deepspeed": {"zeroStage": 3}}}, "spec.distributed", "zeroStage to 2 or less"),
    Bad("offload-with-ddp", {"distributed": {"strategy": "ddp", "deepspeed": {"offload": "optimizer"}}}, "spec.distributed.deepspeed", "set distributed.strategy: deepspeed"),
    Bad("offload-all-zero2", {"distributed": {"deepspeed": {"zeroStage": 2, "offload": "all"}}}, "spec.distributed.deepspeed.offload", "set zeroStage: 3"),
    Bad("offload-zero0", {"distributed": {"deepspeed": {"zeroStage": 0, "offload": "optimizer"}}}, "spec.distributed.deepspeed.offload", "zeroStage 1 or more"),
    Bad("steps-without-every-steps", {"evaluation": {"strategy": "steps"}}, "spec.evaluation.everySteps", "needs evaluation.everySteps"),
    Bad("early-stopping-without-evaluation", {"dataset": VALID_SPLIT, "evaluation": {"strategy": "no", "earlyStopping": {}}}, "spec.evaluation.earlyStopping", "set evaluation.strategy to auto, steps or epoch"),
    Bad("early-stopping-without-validation", {"evaluation": {"earlyStopping": {}}}, "spec.evaluation.earlyStopping", "set dataset.validation or dataset.validationSplit"),
    Bad("early-stopping-metric-not-computed", {"dataset": VALID_SPLIT, "evaluation": {"earlyStopping": {"metric": "bleu"}}}, "spec.evaluation.earlyStopping.metric", "add the metric to evaluation.metrics"),
    Bad("packing-with-prompt-tuning", {"method": {"type": "prompt"}, "dataset": {"packing": True}}, "spec.dataset.packing", "set dataset.packing: false"),
    Bad("merged-model-with-prefix", {"method": {"type": "prefix"}, "output": {"mergedModel": True}}, "spec.output.mergedModel", "lora or qlora"),
    Bad("fp16-on-cpu", {"resources": {"gpusPerNode": 0}, "hyperparameters": {"precision": "fp16"}}, "spec.hyperparameters.precision", "use auto, bf16 or fp32"),
    Bad("ewc-with-zero3", {"dataset": {"replay": {"uri": "s3://d/old.jsonl", "ewcLambda": 10}}, "distributed": {"deepspeed": {"zeroStage": 3}}}, "spec.dataset.replay.ewcLambda", "set ewcLambda to 0"),
    Bad("reserved-env-name", {"env": [{"name": "KUBETUNE_JOB_NAME", "value": "x"}]}, "spec.env[0].name", "reserved for kubetune"),
    Bad("toleration-exists-with-value", {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}}, "spec.resources.tolerations[0].value", "remove value or use operator Equal"),
    # AdapterDeployment
    Bad("adapter-name-not-dns", {"adapters": [{"name": "Support_V1", "source": "s3://a/b/"}]}, "spec.adapters[0].name", "DNS-1123 label", A),
    Bad("duplicate-adapter-names", {"adapters": [{"name": "a", "source": "s3://a/1/"}, {"name": "a", "source": "s3://a/2/"}]}, "spec.adapters", "adapter names must be unique", A),
    Bad("adapter-source-and-ref", {"adapters": [{"name": "a", "source": "s3://a/1/", "fineTuneJobRef": {"name": "job"}}]}, "spec.adapters[0]", "exactly one of source", A),
    Bad("adapter-without-source-or-ref", {"adapters": [{"name": "a"}]}, "spec.adapters[0]", "exactly one of source", A),
    Bad("adapter-source-https", {"adapters": [{"name": "a", "source": "https://example.com/a"}]}, "spec.adapters[0].source", "adapter source must be s3://bucket/path", A),
    Bad("replicas-and-autoscaling", {"replicas": 2, "autoscaling": {"maxReplicas": 3}}, "spec.replicas", "set replicas or autoscaling, not both", A),
    Bad("max-below-min-replicas", {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "spec.autoscaling.maxReplicas", "must be >= autoscaling.minReplicas", A),
    Bad("autoscaling-without-max", {"autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas", "Required value", A),
    Bad("vllm-without-gpu", {"runtime": "vllm"}, "spec.resources.gpus", "set resources.gpus >= 1", A),
    Bad("vllm-block-with-builtin", {"vllm": {"maxLoras": 2}}, "spec.vllm", "remove it or set runtime: vllm", A),
    Bad("runtime-enum", {"runtime": "tgi"}, "spec.runtime", 'supported values: "builtin", "vllm"', A),
    Bad("service-port-70000", {"service": {"port": 70000}}, "spec.service.port", "less than or equal to 65535", A),
]  # fmt: skip


CEL_MESSAGES_TEXT = "\n".join(crd_messages())


def test_invalid_table_is_large_and_unique() -> None:
    assert len(INVALID) >= 30
    assert len({b.id for b in INVALID}) == len(INVALID)


@pytest.mark.parametrize("bad", INVALID, ids=[b.id for b in INVALID])
def test_invalid_manifest_is_rejected_with_field_and_fix(crds: ControlPlane, bad: Bad) -> None:
    manifest = bad.manifest()
    res = crds.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(manifest), namespace="default", check=False
    )
    assert res.returncode != 0, f"the API server accepted {bad.id}:\n{res.stdout}"
    message = res.stderr
    for text in (bad.field, bad.fix, *bad.extra):
        assert text in message, f"{bad.id}: the API server's message lacks {text!r}:\n{message}"

    # The client-side loader (kubetune run --local, the operator) rejects it the same way.
    with pytest.raises(InvalidManifestError) as err:
        LOADERS[bad.kind](manifest)
    assert bad.field in str(err.value), f"{bad.id}: client error does not name {bad.field}:\n{err.value}"
    if bad.fix in CEL_MESSAGES_TEXT:
        assert bad.fix in str(err.value), f"{bad.id}: client message differs from the server's:\n{err.value}"


def test_status_is_validated_too(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", "-", input=json.dumps(FTJ_BASE), namespace=ns)
    res = crds.kubectl(
        "patch", "ftj", "bad", "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Done"}}',
        namespace=ns, check=False,
    )  # fmt: skip
    assert res.returncode != 0 and "status.phase" in res.stderr and '"Succeeded"' in res.stderr


# ---- immutability -----------------------------------------------------------------------------------


IMMUTABLE_PATCHES = [
    ({"method": {"type": "full"}}, "spec.method is immutable"),
    ({"method": {"lora": {"r": 64}}}, "spec.method is immutable"),
    ({"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}, "spec.baseModel is immutable"),
    ({"dataset": {"train": {"uri": "s3://datasets/other.jsonl"}}}, "spec.dataset is immutable"),
    ({"dataset": {"validationSplit": 0.2}}, "spec.dataset is immutable"),
    ({"storage": {"uri": "s3://elsewhere/runs"}}, "spec.storage.uri is immutable"),
]


def test_method_base_model_dataset_are_immutable_suspend_is_not(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", "-", input=json.dumps(FTJ_BASE), namespace=ns)
    for patch, message in IMMUTABLE_PATCHES:
        res = crds.kubectl(
            "patch",
            "ftj",
            "bad",
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
            namespace=ns,
            check=False,
        )
        assert res.returncode != 0, f"{patch} was accepted"
        assert message in res.stderr and "create a new FineTuneJob" in res.stderr, res.stderr

    before = kubectl_json(crds, "get", "ftj", "bad", namespace=ns)
    for patch in (
        {"runPolicy": {"suspend": True}},
        {"runPolicy": {"maxRestarts": 5, "suspend": False}},
        {"hyperparameters": {"learningRate": 0.0001}},
    ):
        crds.kubectl("patch", "ftj", "bad", "--type=merge", "-p", json.dumps({"spec": patch}), namespace=ns)
    after = kubectl_json(crds, "get", "ftj", "bad", namespace=ns)
    assert after["spec"]["runPolicy"] == {"maxRestarts": 5, "suspend": False}
    assert after["spec"]["hyperparameters"]["learningRate"] == 0.0001
    assert after["spec"]["method"] == before["spec"]["method"] == {"type": "lora"}
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 3


# ---- defaults -----------------------------------------------------------------------------------------


def test_defaults_of_the_minimal_finetunejob(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", str(REPO / "examples" / "lora-single-gpu.yaml"), namespace=ns)
    spec = kubectl_json(crds, "get", "ftj", "lora-single-gpu", namespace=ns)["spec"]
    assert spec["method"] == {"type": "lora"}
    assert spec["hyperparameters"]["learningRate"] == 0.0002
    assert spec["hyperparameters"]["epochs"] == 3 and spec["hyperparameters"]["batchSizePerDevice"] == 4
    assert spec["hyperparameters"]["scheduler"] == "linear" and spec["hyperparameters"]["precision"] == "auto"
    assert spec["resources"]["nodes"] == 1 and spec["resources"]["gpusPerNode"] == 1
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert spec["distributed"]["strategy"] == "deepspeed"
    assert spec["checkpointing"] == {"keepLast": 3, "resume": "auto"}
    assert spec["runPolicy"] == {"maxRestarts": 3, "suspend": False}
    assert spec["evaluation"]["metrics"] == ["perplexity"] and spec["evaluation"]["strategy"] == "auto"
    assert spec["dataset"]["train"]["format"] == "auto"
    assert (spec["dataset"]["maxSeqLength"], spec["dataset"]["dedupe"], spec["dataset"]["packing"]) == (
        1024,
        "exact",
        False,
    )
    assert spec["baseModel"]["trustRemoteCode"] is False
    assert spec["storage"]["secretRef"] == {
        "name": "s3-credentials",
        "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
        "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
    }


def test_defaults_inside_blocks_that_are_given(crds: ControlPlane, ns: str) -> None:
    """A block written with one field gets the rest of its defaults (ZeRO stage, LoRA alpha ...)."""
    job = merged(
        FTJ_BASE,
        {
            "spec": {
                "method": {"lora": {"r": 32}},
                "distributed": {"deepspeed": {"offload": "optimizer"}},
                "evaluation": {"earlyStopping": {"patience": 5}},
                "dataset": VALID_SPLIT,
            }
        },
    )
    crds.kubectl("create", "-f", "-", input=json.dumps(job), namespace=ns)
    spec = kubectl_json(crds, "get", "ftj", "bad", namespace=ns)["spec"]
    assert spec["method"]["lora"] == {"r": 32, "alpha": 16, "dropout": 0.05, "bias": "none"}
    assert spec["distributed"]["deepspeed"] == {"zeroStage": 2, "offload": "optimizer"}
    assert spec["evaluation"]["earlyStopping"] == {"metric": "eval_loss", "patience": 5, "threshold": 0}
    assert spec == load_finetunejob(job).to_manifest()["spec"]


def test_defaults_of_an_adapterdeployment(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", "-", input=json.dumps(ADEP_BASE), namespace=ns)
    spec = kubectl_json(crds, "get", "adep", "bad", namespace=ns)["spec"]
    assert spec["runtime"] == "builtin" and spec["hotReload"] is False
    assert spec["service"] == {"port": 8000, "type": "ClusterIP"}
    assert spec["resources"] == {"gpus": 0, "gpuResourceName": "nvidia.com/gpu"}
    assert "replicas" not in spec  # the operator runs 1 unless autoscaling is set
    assert spec == load_adapterdeployment(ADEP_BASE).to_manifest()["spec"]


# ---- kubectl explain ------------------------------------------------------------------------------------


def schema_node(kind: str, dotted: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / f"{kind.lower()}s.yaml").read_text())
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in dotted.split("."):
        node = node["properties"][part]
        if node.get("type") == "array":
            node = {**node["items"], "description": node["description"]}
    return node


def flat(text: str) -> str:
    return " ".join(text.split())


EXPLAINED = [
    ("FineTuneJob", "spec"),
    ("FineTuneJob", "spec.method.lora.r"),
    ("FineTuneJob", "spec.method.type"),
    ("FineTuneJob", "spec.hyperparameters.learningRate"),
    ("FineTuneJob", "spec.resources.gpusPerNode"),
    ("FineTuneJob", "spec.distributed.deepspeed.zeroStage"),
    ("FineTuneJob", "spec.storage.uri"),
    ("FineTuneJob", "spec.dataset.replay.ewcLambda"),
    ("FineTuneJob", "status.progress.percent"),
    ("AdapterDeployment", "spec.adapters.name"),
    ("AdapterDeployment", "spec.adapters.fineTuneJobRef"),
    ("AdapterDeployment", "spec.runtime"),
]


@pytest.mark.parametrize(("kind", "path"), EXPLAINED, ids=[f"{k}.{p}" for k, p in EXPLAINED])
def test_kubectl_explain_prints_descriptions(crds: ControlPlane, kind: str, path: str) -> None:
    resource = f"{kind.lower()}.{path}"

    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    def explained() -> str | None:
        res = crds.kubectl("explain", resource, check=False)
        return res.stdout if res.returncode == 0 else None

    out = eventually(explained, timeout=30, what=f"kubectl explain {resource}")
    node = schema_node(kind, path)
    assert flat(node["description"]) in flat(out)
    for key, sub in (node.get("properties") or {}).items():
        assert re.search(rf"^  {key}\t", out, re.M), f"{resource}: field {key} not listed"
        assert flat(sub["description"]) in flat(out), f"{resource}.{key}: description not printed"
    for value in node.get("enum") or []:
        assert re.search(rf"^\s+{value}$", out, re.M), f"{resource}: enum value {value} not listed"


# ---- printer columns, short names, category ---------------------------------------------------------------


def table(text: str) -> list[dict[str, str]]:
    """Parse `kubectl get` output: columns start where their header starts."""
    header, *rows = text.rstrip("\n").splitlines()
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    out = []
    for row in rows:
        cells = {}
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else None
            cells[name] = row[start:end].strip()
        out.append(cells)
    return out


def patch_status(cluster: ControlPlane, ns: str, resource: str, status: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch",
        resource,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        namespace=ns,
    )


def test_finetunejob_columns(crds: ControlPlane, ns: str) -> None:
    job = merged(
        FTJ_BASE, {"metadata": {"name": "cols"}, "spec": {"resources": {"nodes": 2, "gpusPerNode": 8}}}
    )
    crds.kubectl("create", "-f", "-", input=json.dumps(job), namespace=ns)
    (fresh,) = table(crds.kubectl("get", "ftj", namespace=ns).stdout)
    assert fresh["NAME"] == "cols" and fresh["METHOD"] == "lora" and fresh["PHASE"] == ""

    patch_status(
        crds, ns, "ftj/cols",
        {"phase": "Running", "workers": "2x8", "attempt": 2,
         "progress": {"percent": 42.5, "trainLoss": 1.234, "evalLoss": 1.5, "etaSeconds": 600}},
    )  # fmt: skip
    (row,) = table(crds.kubectl("get", "finetunejobs", namespace=ns).stdout)
    assert list(row) == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "METHOD", "WORKERS", "AGE"]
    assert (row["PHASE"], row["PROGRESS"], row["LOSS"], row["ETA"]) == ("Running", "42.5", "1.234", "600")
    assert (row["METHOD"], row["WORKERS"]) == ("lora", "2x8")
    assert re.fullmatch(r"\d+s", row["AGE"])
    (wide,) = table(crds.kubectl("get", "ftj", "cols", "-o", "wide", namespace=ns).stdout)
    assert (wide["ATTEMPT"], wide["EVAL LOSS"]) == ("2", "1.5")


def test_adapterdeployment_columns(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", "-", input=json.dumps(ADEP_BASE), namespace=ns)
    endpoint = f"http://bad.{ns}.svc:8000/v1"
    patch_status(
        crds,
        ns,
        "adep/bad",
        {"phase": "Ready", "readyReplicas": 2, "readyAdapters": "1/1", "endpoint": endpoint},
    )
    (row,) = table(crds.kubectl("get", "adep", namespace=ns).stdout)
    assert list(row) == ["NAME", "PHASE", "READY", "ADAPTERS", "ENDPOINT", "AGE"]
    assert (row["NAME"], row["PHASE"], row["READY"], row["ADAPTERS"]) == ("bad", "Ready", "2", "1/1")
    assert row["ENDPOINT"] == endpoint
    (wide,) = table(crds.kubectl("get", "adapterdeployment", "bad", "-o", "wide", namespace=ns).stdout)
    assert wide["RUNTIME"] == "builtin"


def test_short_names_and_the_kubetune_category(crds: ControlPlane, ns: str) -> None:
    crds.kubectl("create", "-f", "-", input=json.dumps(FTJ_BASE), namespace=ns)
    crds.kubectl("create", "-f", "-", input=json.dumps(ADEP_BASE), namespace=ns)
    names = crds.kubectl("get", "kubetune", "-o", "name", namespace=ns).stdout.split()
    assert sorted(names) == ["adapterdeployment.kubetune.io/bad", "finetunejob.kubetune.io/bad"]
    assert crds.kubectl("get", "ftj", "-o", "name", namespace=ns).stdout.split() == [
        "finetunejob.kubetune.io/bad"
    ]
    assert crds.kubectl("get", "adep", "-o", "name", namespace=ns).stdout.split() == [
        "adapterdeployment.kubetune.io/bad"
    ]
    resources = crds.kubectl("api-resources", "--api-group=kubetune.io", "-o", "wide").stdout
    for line in ("finetunejobs", "adapterdeployments"):
        assert re.search(
            rf"^{line}\s+(ftj|adep)\s+kubetune.io/v1alpha1\s+true\s+\w+\s+.*kubetune", resources, re.M
        ), resources


def test_status_subresource_ignores_spec_and_spec_update_ignores_status(crds: ControlPlane, ns: str) -> None:
    """Users cannot write status with a spec update, and the status writer cannot change the spec."""
    crds.kubectl("create", "-f", "-", input=json.dumps(FTJ_BASE), namespace=ns)
    crds.kubectl(
        "patch",
        "ftj",
        "bad",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Succeeded"}}),
        namespace=ns,
    )
    patch_status(crds, ns, "ftj/bad", {"phase": "Running"})
    crds.kubectl(
        "patch", "ftj", "bad", "--subresource=status", "--type=merge",
        "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}), namespace=ns,
    )  # fmt: skip
    obj = kubectl_json(crds, "get", "ftj", "bad", namespace=ns)
    assert obj["status"]["phase"] == "Running"
    assert obj["spec"]["runPolicy"]["suspend"] is False
