"""Render the CRDs and docs/api.md from the typed models.

    python -m kubetune_operator.crdgen write   # crds/*.yaml, charts/kubetune/crds/*.yaml, docs/api.md
    python -m kubetune_operator.crdgen check   # exit 1 with a diff when a committed file is stale

pydantic's JSON schema is turned into a Kubernetes *structural* schema: references inlined,
`X | None` collapsed to X, free-form maps marked x-kubernetes-preserve-unknown-fields, JSON
Schema's numeric exclusiveMinimum turned into OpenAPI v3's boolean form, defaults taken from
the models (nested blocks default to {} so the API server fills in their own defaults), and
CEL rules carried over from `json_schema_extra`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .api import (
    GROUP,
    VERSION,
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

REPO = Path(__file__).resolve().parents[2]

Schema = dict[str, Any]

KINDS: list[dict[str, Any]] = [
    {
        "kind": "FineTuneJob",
        "plural": "finetunejobs",
        "short": ["ftj"],
        "spec": FineTuneJobSpec,
        "status": FineTuneJobStatus,
        "description": "A fine-tuning run: multi-GPU, multi-node DeepSpeed training pods whose checkpoints and final "
        "adapter land in S3-compatible storage. Resumes from the latest checkpoint after a failure or preemption.",
        "columns": [
            {
                "name": "Phase",
                "type": "string",
                "jsonPath": ".status.phase",
                "description": "Where the job is.",
            },
            {
                "name": "Progress",
                "type": "number",
                "format": "float",
                "jsonPath": ".status.progress.percent",
                "description": "Percent of training steps done.",
            },
            {
                "name": "Loss",
                "type": "number",
                "format": "float",
                "jsonPath": ".status.progress.trainLoss",
                "description": "Latest training loss.",
            },
            {
                "name": "ETA",
                "type": "integer",
                "jsonPath": ".status.progress.etaSeconds",
                "description": "Estimated seconds left.",
            },
            {
                "name": "Method",
                "type": "string",
                "jsonPath": ".spec.method.type",
                "description": "Fine-tuning method.",
            },
            {
                "name": "Workers",
                "type": "string",
                "jsonPath": ".status.workers",
                "description": "nodes x GPUs.",
            },
            {
                "name": "Attempt",
                "type": "integer",
                "jsonPath": ".status.attempt",
                "priority": 1,
                "description": "Current attempt.",
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    {
        "kind": "AdapterDeployment",
        "plural": "adapterdeployments",
        "short": ["adep"],
        "spec": AdapterDeploymentSpec,
        "status": AdapterDeploymentStatus,
        "description": "Serves a base model with several adapters (from S3 or from FineTuneJobs) behind an "
        "OpenAI-compatible API, with kubetune's built-in server or vLLM.",
        "columns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where it is."},
            {
                "name": "Ready",
                "type": "integer",
                "jsonPath": ".status.readyReplicas",
                "description": "Ready replicas.",
            },
            {
                "name": "Adapters",
                "type": "string",
                "jsonPath": ".status.readyAdapters",
                "description": "Adapters served / listed.",
            },
            {
                "name": "Runtime",
                "type": "string",
                "jsonPath": ".spec.runtime",
                "priority": 1,
                "description": "Runtime.",
            },
            {
                "name": "Endpoint",
                "type": "string",
                "jsonPath": ".status.endpoint",
                "description": "OpenAI base URL.",
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
]


# ---- pydantic -> structural schema ----------------------------------------------------------------


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from root, by class name (the $defs keys)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for f in tp.model_fields.values():
                visit(f.annotation)
        for arg in getattr(tp, "__args__", ()) or ():
            visit(arg)

    visit(root)
    return found


def _factory_default(model: type[BaseModel], alias: str) -> tuple[bool, Any]:
    for name, f in model.model_fields.items():
        if (f.alias or name) != alias:
            continue
        if f.default_factory is not None:
            value = f.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return True, {}  # the API server then fills in the block's own defaults
            if value in ({}, []):
                return False, None
            return True, value
        if f.default is not PydanticUndefined and f.default is not None:
            value = f.default
            return True, value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value
    return False, None


class _Converter:
    def __init__(self, root: type[BaseModel]) -> None:
        self.schema = root.model_json_schema(by_alias=True)
        self.defs = self.schema.get("$defs", {})
        self.models = _models(root)

    def convert(self) -> Schema:
        return self._node(self.schema, self.schema.get("title", ""))

    def _node(self, node: Schema, model_name: str | None = None) -> Schema:
        node = dict(node)
        if "$ref" in node:
            name = node.pop("$ref").split("/")[-1]
            target = self._node(self.defs[name], name)
            return self._merge_field(target, node)
        if "allOf" in node and len(node["allOf"]) == 1:
            inner = self._node(node.pop("allOf")[0])
            return self._merge_field(inner, node)
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union of {options} in a structural schema")
            inner = self._node(options[0])
            return self._merge_field(inner, node)
        out: Schema = {}
        if node.get("description"):
            out["description"] = " ".join(node["description"].split())
        if "const" in node:
            node.setdefault("enum", [node["const"]])
        typ = node.get("type")
        if typ is None and "enum" in node:
            typ = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
        if typ == "object" or "properties" in node:
            out["type"] = "object"
            props = node.get("properties") or {}
            model = self.models.get(model_name or node.get("title", ""))
            if props:
                out["properties"] = {}
                for key, sub in props.items():
                    converted = self._node(sub)
                    converted.pop("default", None)
                    if model is not None:
                        has, default = _factory_default(model, key)
                        if has:
                            converted["default"] = default
                    out["properties"][key] = converted
                if node.get("required"):
                    out["required"] = list(node["required"])
            else:
                extra = node.get("additionalProperties")
                if isinstance(extra, dict) and extra:
                    out["additionalProperties"] = self._node(extra)
                else:
                    out["x-kubernetes-preserve-unknown-fields"] = True
        elif typ == "array":
            out["type"] = "array"
            out["items"] = self._node(node.get("items") or {"type": "object"})
        elif typ in ("string", "integer", "number", "boolean"):
            out["type"] = typ
        else:
            raise ValueError(f"unsupported schema node {node}")
        for k in (
            "enum",
            "pattern",
            "format",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
        ):
            if k in node:
                out[k] = node[k]
        # JSON Schema 2020 numeric exclusive bounds -> OpenAPI v3 booleans.
        for k, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if k in node:
                out[bound] = node[k]
                out[k] = True
        for k, v in node.items():
            if k.startswith("x-kubernetes-"):
                out[k] = v
        return out

    @staticmethod
    def _merge_field(inner: Schema, field: Schema) -> Schema:
        """Field-level keys (description, validations, bounds) win over the referenced type's."""
        out = dict(inner)
        if field.get("description"):
            out["description"] = " ".join(field["description"].split())
        for k, v in field.items():
            if k.startswith("x-kubernetes-validations"):
                out[k] = [*out.get(k, []), *v]
            elif k.startswith("x-kubernetes-") or k in (
                "maxItems",
                "maxLength",
                "pattern",
                "minimum",
                "maximum",
            ):
                out[k] = v
        return out


def structural_schema(model: type[BaseModel]) -> Schema:
    return _Converter(model).convert()


# ---- CRDs -----------------------------------------------------------------------------------------


def crd(kind: dict[str, Any]) -> dict[str, Any]:
    spec = structural_schema(kind["spec"])
    status = structural_schema(kind["status"])
    root = {
        "type": "object",
        "description": kind["description"],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": kind["kind"]},
            "metadata": {"type": "object"},  # the API server allows nothing more here
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind['plural']}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind["kind"],
                "listKind": f"{kind['kind']}List",
                "plural": kind["plural"],
                "singular": kind["kind"].lower(),
                "shortNames": kind["short"],
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind["columns"],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Repeated enums stay inline (no &id001 anchors): the file is read by humans and diffed by GitOps."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


HEADER = "# Generated by `make generate` (python -m kubetune_operator.crdgen) from operator/kubetune_operator/api/. Do not edit.\n"


def render_crds() -> dict[str, str]:
    return {
        f"{k['plural']}.yaml": HEADER + yaml.dump(crd(k), Dumper=_NoAliases, sort_keys=False, width=120)
        for k in KINDS
    }


# ---- docs/api.md ----------------------------------------------------------------------------------


def _type_of(node: Schema) -> str:
    t = node.get("type", "object")
    if t == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if t == "object" and "additionalProperties" in node:
        return f"map[string]{_type_of(node['additionalProperties'])}"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    return t


def _constraints(node: Schema) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append((">" if node.get("exclusiveMinimum") else ">=") + f" {node['minimum']}")
    if "maximum" in node:
        parts.append(("<" if node.get("exclusiveMaximum") else "<=") + f" {node['maximum']}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    return "; ".join(parts)


def _doc_object(path: str, node: Schema, lines: list[str]) -> None:
    props = node.get("properties") or {}
    if not props:
        return
    lines += [f"### `{path}`", "", node.get("description", ""), ""]
    lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    required = set(node.get("required") or [])
    nested = []
    for key, sub in props.items():
        default = (
            f"`{yaml.safe_dump(sub['default'], default_flow_style=True).strip()}`" if "default" in sub else ""
        )
        desc = sub.get("description", "")
        extra = _constraints(sub)
        if extra:
            desc += f" ({extra})"
        name = f"`{key}`" + (" (required)" if key in required else "")
        lines.append(f"| {name} | {_type_of(sub)} | {default} | {desc.replace('|', '/')} |")
        target = sub.get("items", {}) if sub.get("type") == "array" else sub
        if target.get("properties"):
            nested.append((f"{path}.{key}" + ("[]" if sub.get("type") == "array" else ""), target))
    validations = node.get("x-kubernetes-validations") or []
    lines.append("")
    if validations:
        lines += ["Validation rules (the API server rejects objects that break them, with this message):", ""]
        lines += [f"- `{v['rule']}`: {v['message']}" for v in validations]
        lines.append("")
    for p, sub in nested:
        _doc_object(p, sub, lines)


def render_docs() -> str:
    lines = [
        "<!-- Generated by `make generate` from operator/kubetune_operator/api/. Do not edit. -->",
        "# API reference: kubetune.io/v1alpha1",
        "",
        "Both kinds are namespaced, have a status subresource and belong to the `kubetune` category "
        "(`kubectl get kubetune`). `kubectl explain finetunejob.spec` prints the same descriptions.",
        "",
    ]
    for k in KINDS:
        c = crd(k)
        version = c["spec"]["versions"][0]
        names = c["spec"]["names"]
        lines += [
            f"## {k['kind']} (`{names['plural']}`, short name `{names['shortNames'][0]}`)",
            "",
            k["description"],
            "",
        ]
        lines += [
            "`kubectl get` columns: " + ", ".join(col["name"] for col in version["additionalPrinterColumns"]),
            "",
        ]
        schema = version["schema"]["openAPIV3Schema"]
        _doc_object("spec", schema["properties"]["spec"], lines)
        _doc_object("status", schema["properties"]["status"], lines)
    return "\n".join(lines).rstrip() + "\n"


# ---- files ---------------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, text in render_crds().items():
        files[REPO / "crds" / name] = text
        files[REPO / "charts" / "kubetune" / "crds" / name] = text
    files[REPO / "docs" / "api.md"] = render_docs()
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune_operator.crdgen")
    p.add_argument("command", choices=["write", "check"])
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else ""
        if args.command == "write":
            if current != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)}")
        elif current != text:
            stale.append(path)
            diff = difflib.unified_diff(
                current.splitlines(),
                text.splitlines(),
                f"{path.relative_to(REPO)} (committed)",
                "(generated)",
                lineterm="",
            )
            print("\n".join(list(diff)[:40]))
    if stale:
        print(
            f"\n{len(stale)} generated file(s) are stale: "
            + ", ".join(str(s.relative_to(REPO)) for s in stale)
            + "\nRun `make generate` and commit the result.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
