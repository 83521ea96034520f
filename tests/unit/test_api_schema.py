"""The generated CRDs are structural, documented, bounded and carry the rules the issue lists."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator import crdgen
from kubetune_operator.api import AdapterDeployment, FineTuneJob
from kubetune_operator.api.openapi import SchemaError, model_schema
from kubetune_trainer.apimodel import Rule, class_rules, field_rules, iter_models
from tests.unit.test_api_cases import INVALID

CRDS = {k.name: crdgen.crd(k) for k in crdgen.KINDS}

# The only free-form objects: Kubernetes passthrough (affinity, valueFrom) and raw DeepSpeed keys.
FREE_FORM = {
    "FineTuneJob.spec.resources.affinity",
    "FineTuneJob.spec.distributed.deepspeed.config",
    "FineTuneJob.spec.env[].valueFrom",
    "AdapterDeployment.spec.affinity",
    "AdapterDeployment.spec.env[].valueFrom",
    # A FineTuneSweep's template is a FineTuneJob spec: the same passthrough objects.
    "FineTuneSweep.spec.template.resources.affinity",
    "FineTuneSweep.spec.template.distributed.deepspeed.config",
    "FineTuneSweep.spec.template.env[].valueFrom",
}
FORBIDDEN_KEYS = {"$ref", "$defs", "definitions", "allOf", "oneOf", "not", "nullable", "title", "const"}


def schema(kind: str) -> dict[str, Any]:
    return CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from nodes(sub, f"{path}.{key}")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


ALL_NODES = [(p, n) for kind in CRDS for p, n in nodes(schema(kind), kind)]


def test_the_checks_catch_problems() -> None:
    assert structural_problems("X.spec.a", {"description": "d", "$ref": "#/x", "type": "object"})
    assert structural_problems("X.spec.a", {"description": "d", "anyOf": [{"type": "string"}]})
    assert house_rule_problems("X.spec.a", {"type": "string"}) == [
        "X.spec.a has no description (kubectl explain prints it)",
        "X.spec.a: unbounded string",
    ]


def all_rules() -> list[Rule]:
    out: list[Rule] = []
    for root in (FineTuneJob, AdapterDeployment):
        out += list(root.__name_rules__)
        for model in iter_models(root):
            out += class_rules(model)
            for name in model.model_fields:
                out += field_rules(model, name)
    return list(dict.fromkeys(out))


def structural_problems(path: str, node: dict[str, Any]) -> list[str]:
    out = []
    if FORBIDDEN_KEYS & set(node):
        out.append(f"{path}: {sorted(FORBIDDEN_KEYS & set(node))}")
    if node.get("x-kubernetes-int-or-string"):
        if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}] or "type" in node:
            out.append(f"{path}: int-or-string must be anyOf integer/string without a type")
    elif (
        node.get("type") not in {"object", "array", "string", "integer", "number", "boolean"}
        or "anyOf" in node
    ):
        out.append(f"{path}: needs exactly one type")
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        out.append(f"{path}: additionalProperties must be a schema (false is not structural)")
    if node.get("x-kubernetes-preserve-unknown-fields") and (
        path not in FREE_FORM or node["type"] != "object"
    ):
        out.append(f"{path} is free-form; type it (only passthrough objects may be free-form)")
    return out


def house_rule_problems(path: str, node: dict[str, Any]) -> list[str]:
    rest = path.partition(".")[2]
    if rest in ("apiVersion", "kind") or rest.startswith("metadata"):
        return []  # described and bounded by Kubernetes itself
    out = []
    if rest and not rest.endswith(("[]", "{}")) and not node.get("description"):
        out.append(f"{path} has no description (kubectl explain prints it)")
    if node.get("type") == "string" and "enum" not in node and "maxLength" not in node:
        out.append(f"{path}: unbounded string")
    if node.get("type") == "array" and "maxItems" not in node:
        out.append(f"{path}: unbounded list")
    return out


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schema_is_structural(kind: str) -> None:
    walked = list(nodes(schema(kind), kind))
    assert len(walked) > 50
    assert [p for path, node in walked for p in structural_problems(path, node)] == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_field_is_documented_and_bounded(kind: str) -> None:
    assert [p for path, node in nodes(schema(kind), kind) for p in house_rule_problems(path, node)] == []


def test_every_free_form_path_exists() -> None:
    found = {p for p, n in ALL_NODES if n.get("x-kubernetes-preserve-unknown-fields")}
    assert found == FREE_FORM


def test_resource_quantities_are_int_or_string() -> None:
    spec = schema("FineTuneJob")["properties"]["spec"]["properties"]["resources"]["properties"]
    for key in ("cpu", "memory", "sharedMemorySize"):
        assert spec[key]["x-kubernetes-int-or-string"] is True


def test_adapters_are_a_list_map_keyed_by_name() -> None:
    adapters = schema("AdapterDeployment")["properties"]["spec"]["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]
    assert "name" in adapters["items"]["required"]


def validations(kind: str) -> list[dict[str, Any]]:
    return [v for _, n in nodes(schema(kind), kind) for v in n.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("FineTuneJob", "method.lora only applies to method.type lora"),
        ("FineTuneJob", "method.type qlora needs GPUs"),
        ("FineTuneJob", "only applies with strategy deepspeed"),
        ("FineTuneJob", "storage.uri must look like s3://bucket or s3://bucket/prefix"),
        ("FineTuneJob", "set dataset.validation or dataset.validationSplit, not both"),
        ("FineTuneJob", "spec.method is immutable: create a new FineTuneJob to change the method"),
        ("FineTuneJob", "spec.baseModel is immutable: create a new FineTuneJob to change the base model"),
        ("FineTuneJob", "spec.dataset is immutable: create a new FineTuneJob to change the data"),
        ("FineTuneJob", "spec.storage.uri is immutable: the job's checkpoints live there"),
        ("FineTuneJob", "spec.resources.nodes is immutable: the training Job is sized for it"),
        ("FineTuneJob", "spec.resources.gpusPerNode is immutable: the training Job is sized for it"),
        ("AdapterDeployment", "adapter names must be unique"),
        ("AdapterDeployment", "adapter name must be a DNS-1123 label"),
        ("AdapterDeployment", "each adapter needs exactly one of source"),
    ],
)
def test_cross_field_rule_exists(kind: str, message: str) -> None:
    assert any(message in v["message"] for v in validations(kind)), message


def test_immutability_rules_are_transition_rules_on_the_field() -> None:
    spec = schema("FineTuneJob")["properties"]["spec"]["properties"]
    for field in ("baseModel", "dataset", "method"):
        [rule] = [v for v in spec[field].get("x-kubernetes-validations", []) if "oldSelf" in v["rule"]]
        assert rule["rule"] == "self == oldSelf" and rule["message"].startswith(f"spec.{field} is immutable")
    storage_uri = spec["storage"]["properties"]["uri"]
    assert any(v["rule"] == "self == oldSelf" for v in storage_uri["x-kubernetes-validations"])
    resources = spec["resources"]
    for field in ("nodes", "gpusPerNode"):
        [rule] = resources["properties"][field]["x-kubernetes-validations"]
        assert rule["rule"] == "self == oldSelf"
        assert rule["message"].startswith(f"spec.resources.{field} is immutable")
        # Present in every stored object (defaulted), so the rule always has an oldSelf to compare.
        assert field in resources["default"] or "default" in resources["properties"][field]


def test_every_rule_is_exercised_by_the_invalid_table() -> None:
    """Each rule (client mirror and CEL) is hit by at least one invalid manifest: unit and integration."""
    untested = [
        r.message
        for r in all_rules()
        if not r.is_transition
        and not any(c.fix in r.message or (c.server or "") in r.message for c in INVALID)
    ]
    assert not untested, untested


def test_every_rule_other_than_transitions_has_a_client_mirror() -> None:
    assert all(r.check is not None or r.is_transition for r in all_rules())
    with pytest.raises(ValueError, match="needs a Python mirror"):
        Rule("self.a > 0", "a must be positive")


def test_crd_metadata() -> None:
    ftj, adep = CRDS["FineTuneJob"], CRDS["AdapterDeployment"]
    assert ftj["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert ftj["spec"]["names"]["shortNames"] == ["ftj"] and adep["spec"]["names"]["shortNames"] == ["adep"]
    for c in (ftj, adep):
        [version] = c["spec"]["versions"]
        assert c["spec"]["group"] == "kubetune.io" and version["name"] == "v1alpha1"
        assert c["spec"]["names"]["categories"] == ["kubetune"] and c["spec"]["scope"] == "Namespaced"
        assert version["subresources"] == {"status": {}} and version["served"] and version["storage"]


def test_printer_columns() -> None:
    def columns(kind: str) -> dict[str, str]:
        return {
            c["name"]: c["jsonPath"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        }

    assert columns("FineTuneJob") == {
        "Phase": ".status.phase",
        "Progress": ".status.progress.percent",
        "Loss": ".status.progress.trainLoss",
        "ETA": ".status.progress.etaSeconds",
        "Method": ".spec.method.type",
        "Workers": ".status.workers",
        "Attempt": ".status.attempt",
        "Eval Loss": ".status.progress.evalLoss",
        "Age": ".metadata.creationTimestamp",
    }
    assert columns("AdapterDeployment") == {
        "Phase": ".status.phase",
        "Ready": ".status.readyReplicas",
        "Adapters": ".status.readyAdapters",
        "Runtime": ".spec.runtime",
        "Endpoint": ".status.endpoint",
        "Age": ".metadata.creationTimestamp",
    }


def test_printer_column_paths_exist_in_the_schema() -> None:
    for kind, c in CRDS.items():
        for col in c["spec"]["versions"][0]["additionalPrinterColumns"]:
            node = schema(kind)
            for part in col["jsonPath"].strip(".").split("."):
                if part == "creationTimestamp":
                    break
                node = node["properties"][part]
            else:
                assert node["type"] == {"date": "string"}.get(col["type"], col["type"]), col


def test_rendering_is_deterministic_and_has_no_yaml_anchors() -> None:
    first, second = crdgen.render_crds(), crdgen.render_crds()
    assert first == second and crdgen.render_docs() == crdgen.render_docs()
    for text in first.values():
        assert "&id" not in text and "*id" not in text
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_docs_cover_every_field_and_rule_message() -> None:
    docs = crdgen.render_docs()
    for kind in CRDS:
        for path, _node in nodes(schema(kind)["properties"]["spec"], "spec"):
            if path != "spec" and not path.endswith(("[]", "{}")):
                assert f"`{path.rsplit('.', 1)[1]}`" in docs, path
    for rule in all_rules():
        assert rule.message in docs, rule.message


def test_check_reports_stale_files_and_write_fixes_them(tmp_path: Path) -> None:
    assert crdgen.main(["write", "--repo", str(tmp_path)]) == 0
    assert crdgen.check(tmp_path) == []
    target = tmp_path / "charts" / "kubetune" / "crds" / "finetunejobs.yaml"
    target.write_text(target.read_text().replace("- ftj\n", "- fj\n"))
    out = io.StringIO()
    assert crdgen.check(tmp_path, out=out) == [target]
    assert "-    - fj" in out.getvalue() and "+    - ftj" in out.getvalue()
    assert crdgen.main(["check", "--repo", str(tmp_path)]) == 1
    crdgen.write(tmp_path)
    assert crdgen.main(["check", "--repo", str(tmp_path)]) == 0


def test_committed_files_are_up_to_date() -> None:
    stale = crdgen.check(crdgen.REPO, out=io.StringIO())
    assert not stale, f"run `make generate`: {stale}"


def test_schema_walk_refuses_undocumented_or_unbounded_fields() -> None:
    from pydantic import Field

    from kubetune_trainer.apimodel import ApiModel

    class NoDescription(ApiModel):
        """A model with an undocumented field."""

        x: int = 1

    class Unbounded(ApiModel):
        """A model with an unbounded string."""

        s: str = Field("a", description="A string without max_length.")

    with pytest.raises(SchemaError, match="needs a description"):
        model_schema(NoDescription)
    with pytest.raises(SchemaError, match="max_length"):
        model_schema(Unbounded)
