"""Render the CRDs and docs/api.md from the typed models in kubetune_operator.api.

    python -m kubetune_operator.crdgen write   # crds/*.yaml, charts/kubetune/crds/*.yaml, docs/api.md
    python -m kubetune_operator.crdgen check   # exit 1 with a diff when a committed file is stale

`make generate` and `make verify` call exactly these. Output is deterministic: the schema
walk (api/openapi.py) emits keys in a fixed order and the YAML dumper neither sorts nor
aliases, so the same models always give the same bytes (GitOps sees no drift).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.apimodel import ApiModel

from .api import GROUP, VERSION, AdapterDeployment, FineTuneJob, FineTuneSweep
from .api.openapi import Schema, describe, root_schema

REPO = Path(__file__).resolve().parents[2]
CATEGORY = "kubetune"


@dataclass(frozen=True)
class Kind:
    model: type[ApiModel]
    plural: str
    short_names: list[str]
    columns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.__name__


def _col(name: str, typ: str, path: str, description: str, priority: int = 0, fmt: str | None = None) -> dict:
    col: dict[str, Any] = {"name": name, "type": typ}
    if fmt:
        col["format"] = fmt
    col["jsonPath"] = path
    col["description"] = description
    if priority:
        col["priority"] = priority
    return col


AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

# Columns reading .status.* stay empty until the operator (or trainer) writes those fields.
KINDS = [
    Kind(
        FineTuneJob,
        "finetunejobs",
        ["ftj"],
        [
            _col(
                "Phase",
                "string",
                ".status.phase",
                "Pending, Queued, Running, Succeeded, Failed or Suspended.",
            ),
            _col(
                "Progress",
                "number",
                ".status.progress.percent",
                "Percent of training steps done.",
                fmt="float",
            ),
            _col("Loss", "number", ".status.progress.trainLoss", "Latest training loss.", fmt="float"),
            _col("ETA", "integer", ".status.progress.etaSeconds", "Estimated seconds left."),
            _col("Method", "string", ".spec.method.type", "Fine-tuning method."),
            _col("Workers", "string", ".status.workers", "Nodes x GPUs per node, e.g. 2x8."),
            _col("Attempt", "integer", ".status.attempt", "Current attempt.", priority=1),
            _col("Eval Loss", "number", ".status.progress.evalLoss", "Latest validation loss.", 1, "float"),
            AGE,
        ],
    ),
    Kind(
        FineTuneSweep,
        "finetunesweeps",
        ["fts"],
        [
            _col("Phase", "string", ".status.phase", "Pending, Running, Succeeded or Failed."),
            _col("Trials", "string", ".status.completed", "Finished trials / all trials."),
            _col("Running", "integer", ".status.running", "Trials running now."),
            _col(
                "Best",
                "number",
                ".status.bestTrial.objective",
                "Objective of the best trial so far.",
                fmt="float",
            ),
            _col("Best Trial", "string", ".status.bestTrial.name", "The best trial's FineTuneJob."),
            _col("Algorithm", "string", ".spec.algorithm", "grid, random or tpe.", priority=1),
            _col("Pruned", "integer", ".status.pruned", "Trials stopped early.", priority=1),
            AGE,
        ],
    ),
    Kind(
        AdapterDeployment,
        "adapterdeployments",
        ["adep"],
        [
            _col("Phase", "string", ".status.phase", "Pending, Progressing, Ready or Degraded."),
            _col("Ready", "integer", ".status.readyReplicas", "Replicas ready to serve."),
            _col("Adapters", "string", ".status.readyAdapters", "Adapters served / adapters listed."),
            _col("Runtime", "string", ".spec.runtime", "builtin or vllm.", priority=1),
            _col("Endpoint", "string", ".status.endpoint", "OpenAI base URL inside the cluster."),
            AGE,
        ],
    ),
]


# ---- CRDs -----------------------------------------------------------------------------------------


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.name,
                "listKind": f"{kind.name}List",
                "plural": kind.plural,
                "singular": kind.name.lower(),
                "shortNames": kind.short_names,
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind.columns,
                    "schema": {"openAPIV3Schema": root_schema(kind.model)},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """No &id001 anchors (files are read by humans and diffed by GitOps); long lines stay whole."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # CEL rules and regexes read best (and diff best) unfolded.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)

HEADER = (
    "# Generated by `make generate` (python -m kubetune_operator.crdgen) from "
    "operator/kubetune_operator/api/. Do not edit.\n"
)


def render_crds() -> dict[str, str]:
    return {
        f"{k.plural}.yaml": HEADER + yaml.dump(crd(k), Dumper=_Dumper, sort_keys=False, width=100_000)
        for k in KINDS
    }


# ---- docs/api.md ----------------------------------------------------------------------------------


def _type_of(node: Schema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    t = node.get("type", "object")
    if t == "array":
        return f"[]{_type_of(node['items'])}"
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
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} characters")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    if "maxProperties" in node:
        parts.append(f"at most {node['maxProperties']} entries")
    if node.get("x-kubernetes-list-type") == "map":
        parts.append("unique by " + ", ".join(node["x-kubernetes-list-map-keys"]))
    if node.get("x-kubernetes-list-type") == "set":
        parts.append("unique values")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rule_line(where: str, rule: dict[str, Any]) -> str:
    target = (where + rule.get("fieldPath", "")).lstrip(".") or "(object)"
    kind = "on update" if "oldSelf" in rule["rule"] else "create and update"
    return f"- `{target}` ({kind}): {rule['message']}  \n  CEL: `{rule['rule']}`"


def _doc_object(path: str, node: Schema, lines: list[str], shown: tuple[str, ...] = ()) -> None:
    """One table per object; `shown` are rule messages the parent already listed for this field."""
    props = node.get("properties") or {}
    lines += [f"### `{path}`", "", node.get("description", ""), ""]
    lines += ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    required = set(node.get("required") or [])
    nested: list[tuple[str, Schema, tuple[str, ...]]] = []
    rules = [
        _rule_line(path, r) for r in node.get("x-kubernetes-validations") or [] if r["message"] not in shown
    ]
    for key, sub in props.items():
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        desc = sub.get("description", "")
        extra = _constraints(sub)
        if extra:
            desc += f" ({extra})"
        name = f"`{key}`" + (" **required**" if key in required else "")
        lines.append(f"| {name} | {_type_of(sub)} | {_cell(default)} | {_cell(desc)} |")
        own = sub.get("x-kubernetes-validations") or []
        rules += [_rule_line(f"{path}.{key}", r) for r in own]
        target, suffix = (sub["items"], "[]") if sub.get("type") == "array" else (sub, "")
        if target.get("properties"):
            listed = tuple(r["message"] for r in own) if target is sub else ()
            nested.append((f"{path}.{key}{suffix}", target, listed))
    lines.append("")
    if rules:
        lines += [
            "Validation rules (the API server rejects a change that breaks one, with this message):",
            "",
        ]
        lines += [*rules, ""]
    for p, sub, listed in nested:
        _doc_object(p, sub, lines, listed)


def render_docs() -> str:
    lines = [
        "<!-- Generated by `make generate` (python -m kubetune_operator.crdgen) from "
        "operator/kubetune_operator/api/. Do not edit. -->",
        f"# API reference: {GROUP}/{VERSION}",
        "",
        "The kinds are namespaced, have a status subresource and belong to the `kubetune` category "
        "(`kubectl get kubetune`). `kubectl explain finetunejob.spec` prints the same descriptions. "
        "Copyable manifests are in [examples/](../examples/); the design decisions behind the API are in "
        "[api-design.md](api-design.md).",
        "",
        "Defaults are filled in by the API server (read an object back to see them) and, identically, by "
        "`kubetune_operator.api.load_finetunejob` / `load_adapterdeployment` on the client side.",
        "",
    ]
    for k in KINDS:
        c = crd(k)
        version = c["spec"]["versions"][0]
        lines += [
            f"## {k.name}",
            "",
            describe(k.model),
            "",
            f"Plural `{k.plural}`, short name `{k.short_names[0]}`, category `{CATEGORY}`.",
            "",
            "`kubectl get` columns (priority 1 only with `-o wide`):",
            "",
            "| Column | JSONPath | Description |",
            "| --- | --- | --- |",
        ]
        for col in version["additionalPrinterColumns"]:
            wide = " (wide)" if col.get("priority") else ""
            lines.append(
                f"| {col['name']}{wide} | `{col['jsonPath']}` | {_cell(col.get('description', 'Age.'))} |"
            )
        lines.append("")
        schema = version["schema"]["openAPIV3Schema"]
        name_node = schema["properties"]["metadata"].get("properties", {}).get("name", {})
        root_rules = [_rule_line("", r) for r in schema.get("x-kubernetes-validations") or []]
        root_rules += [
            _rule_line("metadata.name", r) for r in name_node.get("x-kubernetes-validations") or []
        ]
        if root_rules:
            lines += ["Object rules:", "", *root_rules, ""]
        _doc_object("spec", schema["properties"]["spec"], lines)
        _doc_object("status", schema["properties"]["status"], lines)
    return "\n".join(lines).rstrip() + "\n"


# ---- files ---------------------------------------------------------------------------------------


def outputs(repo: Path = REPO) -> dict[Path, str]:
    files: dict[Path, str] = {}
    for name, text in render_crds().items():
        files[repo / "crds" / name] = text
        files[repo / "charts" / "kubetune" / "crds" / name] = text
    files[repo / "docs" / "api.md"] = render_docs()
    return files


def write(repo: Path = REPO) -> list[Path]:
    changed = []
    for path, text in outputs(repo).items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def check(repo: Path = REPO, out: Any = sys.stdout) -> list[Path]:
    """The stale files; prints a unified diff of each (committed -> generated)."""
    stale = []
    for path, text in outputs(repo).items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        stale.append(path)
        rel = path.relative_to(repo)
        diff = list(
            difflib.unified_diff(
                current.splitlines(),
                text.splitlines(),
                f"{rel} (committed)",
                f"{rel} (generated)",
                lineterm="",
            )
        )
        shown = diff[:80] + ([f"... {len(diff) - 80} more diff lines"] if len(diff) > 80 else [])
        print("\n".join(shown), file=out)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubetune_operator.crdgen", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("command", choices=["write", "check"])
    p.add_argument("--repo", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    if args.command == "write":
        for path in write(args.repo):
            print(f"wrote {path.relative_to(args.repo)}")
        return 0
    stale = check(args.repo)
    if stale:
        names = ", ".join(str(s.relative_to(args.repo)) for s in stale)
        print(
            f"\n{len(stale)} generated file(s) differ from the models in operator/kubetune_operator/api/: {names}\n"
            "Run `make generate` and commit the result (never edit these files by hand).",
            file=sys.stderr,
        )
        return 1
    print("CRDs and docs/api.md are up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
