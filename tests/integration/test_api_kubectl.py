"""What users see through kubectl: explain teaches every field, get shows the printer columns,
short names and the category work, and status is a subresource."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_operator.api import AdapterDeployment, FineTuneJob, FineTuneSweep
from kubetune_operator.api.openapi import Schema, root_schema
from tests.testground.cluster import ControlPlane
from tests.unit.test_api_cases import adapterdeployment, finetunejob, finetunesweep

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ns(cluster: ControlPlane, kubetune_crds: list[Path]) -> Iterator[str]:
    name = f"kubectl-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def objects(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """(explain path, schema) of node and every object below it that has fields; list items
    are transparent (kubectl explain spec.adapters shows the fields of one adapter)."""
    target = node.get("items", node) if node.get("type") == "array" else node
    props = target.get("properties") or {}
    if props:
        yield path, {**target, "description": node["description"]}
    for key, sub in props.items():
        yield from objects(sub, f"{path}.{key}")


def flat(text: str) -> str:
    return " ".join(text.split())


def explain_problems(out: str, path: str, node: Schema) -> Iterator[str]:
    if flat(node["description"]) not in flat(out):
        yield f"{path}: its description is not printed"
    for key, sub in node["properties"].items():
        if not re.search(rf"^  {key}\t", out, re.M):
            yield f"{path}: field {key} is not listed"
        if flat(sub["description"]) not in flat(out):
            yield f"{path}.{key}: description {sub['description']!r} is not printed"
        # The listing shows the first four allowed values; explaining the field shows them all.
        if "enum" in sub and f"enum: {', '.join(map(str, sub['enum'][:4]))}" not in out:
            yield f"{path}.{key}: allowed values are not listed"


@pytest.mark.parametrize(
    ("model", "resource"), [(FineTuneJob, "finetunejob"), (AdapterDeployment, "adep"), (FineTuneSweep, "fts")]
)
def test_explain_teaches_every_field(
    cluster: ControlPlane, kubetune_crds: list[Path], model: type, resource: str
) -> None:
    """One `kubectl explain` per object lists each of its fields with the field's description:
    together they print every field of spec and status, down to the leaves. Fields with allowed
    values are explained on their own too, where kubectl prints all the values."""
    schema = root_schema(model)["properties"]
    nodes = [*objects(schema["spec"], f"{resource}.spec"), *objects(schema["status"], f"{resource}.status")]
    assert sum(len(n["properties"]) for _, n in nodes) > 50  # down to leaf fields, not just the top level
    problems = []
    for path, node in nodes:
        out = cluster.kubectl("explain", path).stdout
        problems += [f"{p}\n{out}" for p in explain_problems(out, path, node)]
        for key, sub in node["properties"].items():
            if "enum" in sub:
                out = cluster.kubectl("explain", f"{path}.{key}").stdout
                unlisted = [v for v in sub["enum"] if not re.search(rf"^\s+{v}$", out, re.M)]
                if unlisted:
                    problems.append(f"{path}.{key}: allowed values {unlisted} not printed\n{out}")
    assert not problems, "\n".join(problems[:5])


def test_published_openapi_has_a_description_on_every_property(
    cluster: ControlPlane, kubetune_crds: list[Path]
) -> None:
    doc = json.loads(cluster.kubectl("get", "--raw", "/openapi/v3/apis/kubetune.io/v1alpha1").stdout)
    undocumented = []

    def walk(node: dict, path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if path == "" and key == "metadata":
                continue  # ObjectMeta, documented by Kubernetes
            if not sub.get("description"):
                undocumented.append(f"{path}.{key}")
            walk(sub.get("items", sub), f"{path}.{key}")

    for kind in ("FineTuneJob", "AdapterDeployment"):
        walk(doc["components"]["schemas"][f"io.kubetune.v1alpha1.{kind}"], kind)
    assert not undocumented, undocumented


def table(cluster: ControlPlane, ns: str, *args: str) -> list[dict[str, str]]:
    """`kubectl get` output as rows of {COLUMN: value} (columns are separated by 2+ spaces)."""
    lines = cluster.kubectl("get", *args, namespace=ns).stdout.splitlines()
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]  # "EVAL LOSS" is one column
    bounds = [*starts[1:], None]
    return [
        {header[s:e].strip(): line[s:e].strip() for s, e in zip(starts, bounds, strict=True)}
        for line in lines[1:]
    ]


def patch_status(cluster: ControlPlane, ns: str, resource: str, name: str, status: dict) -> None:
    cluster.kubectl(
        "patch", resource, name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}),
        namespace=ns,
    )  # fmt: skip


def test_finetunejob_printer_columns(cluster: ControlPlane, ns: str) -> None:
    job = finetunejob("columns")
    job["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 8}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job), namespace=ns)
    [row] = table(cluster, ns, "ftj", "columns")
    assert row["NAME"] == "columns" and row["METHOD"] == "lora" and row["PHASE"] == ""
    patch_status(
        cluster, ns, "finetunejob", "columns",
        {
            "phase": "Running", "observedGeneration": 1, "attempt": 2, "workers": "2x8",
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "16 of 16",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
            "progress": {"step": 420, "totalSteps": 1000, "epoch": 1.26, "percent": 42.5, "trainLoss": 1.2345,
                         "evalLoss": 1.5, "learningRate": 0.0002, "tokensPerSecond": 5120.5, "etaSeconds": 3600,
                         "updatedAt": "2026-01-01T01:00:00Z"},
            "checkpoint": {"latest": "s3://runs/team-a/ns/columns/uid/checkpoints/checkpoint-400/", "step": 400,
                           "count": 2},
        },
    )  # fmt: skip
    [row] = table(cluster, ns, "finetunejobs", "columns")
    assert list(row) == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "METHOD", "WORKERS", "AGE"]
    assert {k: row[k] for k in ("PHASE", "PROGRESS", "LOSS", "ETA", "METHOD", "WORKERS")} == {
        "PHASE": "Running", "PROGRESS": "42.5", "LOSS": "1.2345", "ETA": "3600", "METHOD": "lora", "WORKERS": "2x8",
    }  # fmt: skip
    assert re.fullmatch(r"\d+s", row["AGE"]), row
    [wide] = table(cluster, ns, "finetunejob", "columns", "-o", "wide")
    assert wide["ATTEMPT"] == "2" and wide["EVAL LOSS"] == "1.5"


def test_adapterdeployment_printer_columns(cluster: ControlPlane, ns: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(adapterdeployment("serving")), namespace=ns)
    patch_status(
        cluster, ns, "adapterdeployment", "serving",
        {
            "phase": "Ready", "readyReplicas": 2, "replicas": 2, "readyAdapters": "1/1", "observedGeneration": 1,
            "endpoint": "http://serving.ns.svc:8000/v1",
            "adapters": [{"name": "support", "uri": "s3://adapters/support/", "ready": True, "message": "served"}],
        },
    )  # fmt: skip
    [row] = table(cluster, ns, "adep", "serving")
    assert list(row) == ["NAME", "PHASE", "READY", "ADAPTERS", "ENDPOINT", "AGE"]
    assert {k: row[k] for k in ("PHASE", "READY", "ADAPTERS", "ENDPOINT")} == {
        "PHASE": "Ready", "READY": "2", "ADAPTERS": "1/1", "ENDPOINT": "http://serving.ns.svc:8000/v1",
    }  # fmt: skip
    [wide] = table(cluster, ns, "adep", "serving", "-o", "wide")
    assert wide["RUNTIME"] == "builtin"


def test_finetunesweep_printer_columns(cluster: ControlPlane, ns: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunesweep("search")), namespace=ns)
    patch_status(
        cluster, ns, "finetunesweep", "search",
        {
            "phase": "Running", "observedGeneration": 1, "completed": "3/8", "running": 2, "pruned": 1,
            "bestTrial": {"name": "search-1", "objective": 0.875},
        },
    )  # fmt: skip
    [row] = table(cluster, ns, "fts", "search")
    assert list(row) == ["NAME", "PHASE", "TRIALS", "RUNNING", "BEST", "BEST TRIAL", "AGE"]
    assert {k: row[k] for k in ("PHASE", "TRIALS", "RUNNING", "BEST", "BEST TRIAL")} == {
        "PHASE": "Running", "TRIALS": "3/8", "RUNNING": "2", "BEST": "0.875", "BEST TRIAL": "search-1",
    }  # fmt: skip
    [wide] = table(cluster, ns, "fts", "search", "-o", "wide")
    assert wide["ALGORITHM"] == "grid" and wide["PRUNED"] == "1"


def test_short_names_and_the_kubetune_category(cluster: ControlPlane, ns: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunejob("in-category")), namespace=ns)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(adapterdeployment("in-category")), namespace=ns)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunesweep("in-category")), namespace=ns)
    out = cluster.kubectl("get", "kubetune", "-o", "name", namespace=ns).stdout.split()
    assert "finetunejob.kubetune.io/in-category" in out and "adapterdeployment.kubetune.io/in-category" in out
    assert "finetunesweep.kubetune.io/in-category" in out
    by_short_name = cluster.kubectl(
        "get", "ftj,adep,fts", "in-category", "-o", "name", namespace=ns
    ).stdout.split()
    assert by_short_name == [
        "finetunejob.kubetune.io/in-category",
        "adapterdeployment.kubetune.io/in-category",
        "finetunesweep.kubetune.io/in-category",
    ]
    resources = cluster.kubectl("api-resources", "--api-group=kubetune.io", "-o", "wide").stdout
    for plural, short in (("finetunejobs", "ftj"), ("adapterdeployments", "adep"), ("finetunesweeps", "fts")):
        assert re.search(
            rf"^{plural}\s+{short}\s+kubetune.io/v1alpha1\s+true\s+\w+\s+.*kubetune", resources, re.M
        ), resources


def test_status_is_a_subresource(cluster: ControlPlane, ns: str) -> None:
    """Users' spec writes cannot set status, and status writes cannot change spec."""
    job = finetunejob("subresource")
    job["status"] = {"phase": "Succeeded"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job), namespace=ns)
    got = json.loads(cluster.kubectl("get", "ftj", "subresource", "-o", "json", namespace=ns).stdout)
    assert "status" not in got or got["status"].get("phase") is None
    cluster.kubectl(
        "patch", "ftj", "subresource", "--subresource=status", "--type=merge",
        "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}, "status": {"phase": "Pending"}}), namespace=ns,
    )  # fmt: skip
    # A spec patch that carries status leaves the status the status writer set.
    cluster.kubectl(
        "patch", "ftj", "subresource", "--type=merge", "-p", json.dumps({"status": {"phase": "Succeeded"}}),
        namespace=ns,
    )  # fmt: skip
    got = json.loads(cluster.kubectl("get", "ftj", "subresource", "-o", "json", namespace=ns).stdout)
    assert got["status"]["phase"] == "Pending" and got["spec"]["runPolicy"]["suspend"] is False


@pytest.mark.parametrize(
    ("status", "field", "says"),
    [
        ({"progress": {"percent": 140}}, "status.progress.percent", "less than or equal to 100"),
        ({"phase": "Done"}, "status.phase", '"Succeeded"'),
    ],
    ids=["percent-over-100", "unknown-phase"],
)
def test_invalid_status_is_rejected(
    cluster: ControlPlane, ns: str, status: dict, field: str, says: str
) -> None:
    """The status schema guards the operator and the trainer too (bounds, the phase enum)."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(finetunejob("bad-status")), namespace=ns)
    res = cluster.kubectl(
        "patch", "ftj", "bad-status", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), namespace=ns, check=False,
    )  # fmt: skip
    assert res.returncode != 0 and field in res.stderr and says in res.stderr, res.stderr
