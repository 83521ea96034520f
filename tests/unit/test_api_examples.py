"""The API without a cluster: generated CRDs are structural and current, defaults agree, examples load.

The API server applies the CRD's `default`s; `load_finetunejob` / `load_adapterdeployment`
apply the models' defaults. Both come from the same models, and these tests make sure the two
never drift apart (the integration tests then compare against a real API server).
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from kubetune_operator import crdgen
from kubetune_operator.api import (
    AdapterDeployment,
    FineTuneJob,
    FineTuneSweep,
    InvalidManifestError,
    load_adapterdeployment,
    load_finetunejob,
    load_finetunesweep,
)
from kubetune_operator.convert import to_config_dict
from kubetune_trainer.config import FinetuningConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
DATA_FILES = sorted((EXAMPLES / "data").glob("*.jsonl"))
# Where the examples' comments tell users to upload examples/data/.
DATASETS_PREFIX = "s3://kubetune/datasets/"

CRD_FILES = {
    "FineTuneJob": REPO / "crds" / "finetunejobs.yaml",
    "AdapterDeployment": REPO / "crds" / "adapterdeployments.yaml",
    "FineTuneSweep": REPO / "crds" / "finetunesweeps.yaml",
}
MODELS: dict[str, type[BaseModel]] = {
    "FineTuneJob": FineTuneJob,
    "AdapterDeployment": AdapterDeployment,
    "FineTuneSweep": FineTuneSweep,
}
LOADERS = {
    "FineTuneJob": load_finetunejob,
    "AdapterDeployment": load_adapterdeployment,
    "FineTuneSweep": load_finetunesweep,
}


def load_crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load(CRD_FILES[kind].read_text())


def root_schema(kind: str) -> dict[str, Any]:
    (version,) = load_crd(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def example(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one manifest per example file, found {len(docs)}"
    return docs[0]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# ---- the generated files ---------------------------------------------------------------------------


def test_generated_files_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    rc = crdgen.main(["check"])
    assert rc == 0, f"generated files are stale; run `make generate`:\n{capsys.readouterr()}"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_crd_names_subresources_and_category(kind: str) -> None:
    crd = load_crd(kind)
    spec = crd["spec"]
    assert spec["group"] == "kubetune.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind
    assert (
        spec["names"]["shortNames"]
        == {"FineTuneJob": ["ftj"], "AdapterDeployment": ["adep"], "FineTuneSweep": ["fts"]}[kind]
    )
    assert spec["names"]["categories"] == ["kubetune"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def _walk(node: dict[str, Any], path: str):
    """Every schema node with its path (properties, array items and map values)."""
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


FORBIDDEN_KEYS = ("$ref", "allOf", "oneOf", "not", "definitions", "$defs", "nullable")


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_schema_is_structural_and_described(kind: str) -> None:
    problems = []
    root = root_schema(kind)
    for path, node in _walk(root, kind):
        for key in FORBIDDEN_KEYS:
            if key in node:
                problems.append(f"{path}: has {key}")
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        if "anyOf" in node and not int_or_string:
            problems.append(f"{path}: anyOf is only allowed for int-or-string")
        if int_or_string:
            if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}]:
                problems.append(f"{path}: int-or-string must be anyOf [integer, string]")
        elif "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("type") == "object" and not (
            "properties" in node
            or "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or path == f"{kind}.metadata"
        ):
            problems.append(f"{path}: an object without properties must preserve unknown fields")
        # Array items and map values are described by their field; metadata belongs to the API server.
        own = path == f"{kind}.metadata" or path.startswith(f"{kind}.metadata.")
        described = own or path.endswith(("[]", "{}"))
        if not described and not (node.get("description") or "").strip():
            problems.append(f"{path}: no description (kubectl explain prints nothing)")
        for rule in node.get("x-kubernetes-validations") or []:
            if not rule.get("message", "").strip():
                problems.append(f"{path}: CEL rule {rule['rule']!r} has no message")
        for key in node.get("required") or []:
            if key not in (node.get("properties") or {}):
                problems.append(f"{path}: required {key} is not a property")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_printer_columns_point_at_schema_fields(kind: str) -> None:
    (version,) = load_crd(kind)["spec"]["versions"]
    root = root_schema(kind)
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns][-1] == "Age"
    for col in columns:
        path = col["jsonPath"]
        if path == ".metadata.creationTimestamp":
            assert col["type"] == "date"
            continue
        node = root
        for part in path.lstrip(".").split("."):
            props = node.get("properties") or {}
            assert part in props, f"column {col['name']}: {path} is not in the schema (no {part!r})"
            node = props[part]
        expected = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean"}
        assert node["type"] == expected[col["type"]], (
            f"column {col['name']} ({col['type']}) reads a {node['type']}"
        )


def test_finetunejob_columns_show_phase_progress_loss_method_workers() -> None:
    (version,) = load_crd("FineTuneJob")["spec"]["versions"]
    default_view = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    for name in ("Phase", "Progress", "Loss", "Method", "Workers", "Age"):
        assert name in default_view


def test_adapterdeployment_columns_show_phase_ready_adapters_endpoint() -> None:
    (version,) = load_crd("AdapterDeployment")["spec"]["versions"]
    default_view = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    for name in ("Phase", "Ready", "Adapters", "Endpoint", "Age"):
        assert name in default_view


# ---- defaults: models vs CRD ----------------------------------------------------------------------


def _core(tp: Any) -> Any:
    """Strip Annotated and Optional."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_default(info: Any) -> tuple[bool, Any]:
    """The value the client fills in for an absent field, as JSON (None: the field stays absent,
    as `to_manifest()` drops it; an empty list would show up, so it counts as a default)."""
    if info.is_required():
        return False, None
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True, exclude_none=True, mode="json")
    return value is not None, value


def _compare_defaults(model: type[BaseModel], node: dict[str, Any], path: str, out: list[str]) -> None:
    props = node.get("properties") or {}
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    assert set(fields) == set(props), f"{path}: model fields {sorted(fields)} != schema {sorted(props)}"
    for alias, info in fields.items():
        sub = props[alias]
        has, value = _model_default(info)
        if has != ("default" in sub) or (has and sub["default"] != value):
            out.append(f"{path}.{alias}: model default {value!r} vs CRD default {sub.get('default')!r}")
        core = _core(info.annotation)
        if get_origin(core) is list:
            core, sub = _core(get_args(core)[0]), sub.get("items") or {}
        if isinstance(core, type) and issubclass(core, BaseModel):
            _compare_defaults(core, sub, f"{path}.{alias}", out)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_every_crd_default_equals_the_model_default(kind: str) -> None:
    """Walks every field (not only those the examples use): the server and the client default alike."""
    root = root_schema(kind)
    model = MODELS[kind]
    out: list[str] = []
    for part in ("spec", "status"):
        sub_model = _core(model.model_fields[part].annotation)
        _compare_defaults(sub_model, root["properties"][part], f"{kind}.{part}", out)
    assert not out, "\n".join(out)


def apply_schema_defaults(value: Any, node: dict[str, Any]) -> Any:
    """The API server's structural defaulting: fill absent properties with `default`, recursively
    (into defaulted values too), through array items and map values."""
    if isinstance(value, dict):
        props = node.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                apply_schema_defaults(item, props[key])
            elif isinstance(node.get("additionalProperties"), dict):
                apply_schema_defaults(item, node["additionalProperties"])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            apply_schema_defaults(item, node["items"])
    return value


MINIMAL = {
    "FineTuneJob": {
        "baseModel": {"uri": "hf://org/model"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
        "storage": {"uri": "s3://bucket"},
    },
    "AdapterDeployment": {"baseModel": {"uri": "hf://org/model"}},
}


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_minimal_spec_defaults_the_same_on_both_sides(kind: str) -> None:
    spec = MINIMAL[kind]
    server = apply_schema_defaults(copy.deepcopy(spec), root_schema(kind)["properties"]["spec"])
    client = LOADERS[kind]({"apiVersion": "kubetune.io/v1alpha1", "kind": kind, "spec": spec})
    assert client.to_manifest()["spec"] == server


def test_documented_finetunejob_defaults() -> None:
    """What docs and examples promise for a job that sets only model, data and storage."""
    spec = load_finetunejob({"spec": MINIMAL["FineTuneJob"]}).to_manifest()["spec"]
    assert spec["method"] == {"type": "lora"}
    hp = spec["hyperparameters"]
    assert (hp["epochs"], hp["learningRate"], hp["batchSizePerDevice"]) == (3, 2e-4, 4)
    assert spec["resources"]["nodes"] == 1 and spec["resources"]["gpusPerNode"] == 1
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert spec["distributed"]["strategy"] == "deepspeed"
    assert spec["checkpointing"] == {"keepLast": 3, "resume": "auto"}
    assert spec["runPolicy"]["maxRestarts"] == 3 and spec["runPolicy"]["suspend"] is False
    assert spec["evaluation"]["metrics"] == ["perplexity"]
    assert spec["dataset"]["train"]["format"] == "auto" and spec["dataset"]["maxSeqLength"] == 1024


# ---- examples ---------------------------------------------------------------------------------------


def test_every_required_example_exists() -> None:
    wanted = {
        "lora-single-gpu.yaml", "qlora.yaml", "full-zero3-2x8.yaml", "prefix-tuning.yaml", "prompt-tuning.yaml",
        "ptuning.yaml", "instruction-early-stopping.yaml", "multi-task-mixture.yaml",
        "continual-learning-replay.yaml", "kueue-queue.yaml", "adapterdeployment-builtin.yaml",
        "adapterdeployment-vllm.yaml",
    }  # fmt: skip
    assert wanted <= {p.name for p in EXAMPLE_FILES}
    index = (EXAMPLES / "README.md").read_text()
    missing = [p.name for p in EXAMPLE_FILES if f"]({p.name})" not in index]
    assert not missing, f"examples/README.md does not list {missing}"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_example_loads_client_side_with_server_defaults(path: Path) -> None:
    obj = example(path)
    assert obj["apiVersion"] == "kubetune.io/v1alpha1"
    assert "namespace" not in obj["metadata"], "examples go to the user's current namespace"
    loaded = LOADERS[obj["kind"]](obj)
    server = apply_schema_defaults(copy.deepcopy(obj["spec"]), root_schema(obj["kind"])["properties"]["spec"])
    assert loaded.to_manifest()["spec"] == server


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_example_header_says_what_it_needs_and_how_to_watch(path: Path) -> None:
    text = path.read_text()
    header = text.split("\napiVersion:", 1)[0]
    assert header.startswith("# "), f"{path.name}: start with a comment that says what the example does"
    assert "Prerequisites" in header and "s3-credentials" in header
    assert f"kubectl apply -f examples/{path.name}" in header
    assert "kubectl get " in header, f"{path.name}: say how to watch it"


def test_minimal_example_is_about_ten_lines() -> None:
    body = [
        line
        for line in (EXAMPLES / "lora-single-gpu.yaml").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(body) <= 15, "\n".join(body)


def _finetunejob_examples() -> list[Path]:
    return [p for p in EXAMPLE_FILES if example(p)["kind"] in ("FineTuneJob", "FineTuneSweep")]


def _job_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob spec of an example (a sweep's template, with the first point of its space)."""
    if obj["kind"] != "FineTuneSweep":
        return obj["spec"]
    from kubetune_operator.finetunesweep import builders, study

    spec = load_finetunesweep(obj).to_manifest()
    spec["metadata"] = {**spec["metadata"], "namespace": "default", "uid": "0000"}
    first = {
        p.path: p.grid_values()[0] if p.values is not None or p.step else p.min
        for p in study.parameters(load_finetunesweep(obj).spec)
    }
    return builders.trial_job(spec, 0, first)["spec"]


@pytest.mark.parametrize("path", _finetunejob_examples(), ids=ids(_finetunejob_examples()))
def test_finetunejob_example_is_a_valid_trainer_config(path: Path) -> None:
    """The API accepting a job is not enough: the trainer in the pod must accept its config too."""
    obj = example(path)
    manifest = load_finetunejob({**obj, "kind": "FineTuneJob", "spec": _job_spec(obj)}).to_manifest()
    manifest["metadata"] = {**manifest["metadata"], "namespace": "default", "uid": "0000"}
    config = FinetuningConfig.from_dict(to_config_dict(manifest, in_pod=True), source=path.name)
    assert config.method == manifest["spec"]["method"]["type"]


def _dataset_uris(spec: dict[str, Any]) -> list[str]:
    ds = spec.get("dataset") or {}
    uris = [(ds.get(k) or {}).get("uri") for k in ("train", "validation", "test", "replay")]
    uris += [m["uri"] for m in ds.get("mixture") or []]
    return [u for u in uris if u]


@pytest.mark.parametrize("path", _finetunejob_examples(), ids=ids(_finetunejob_examples()))
def test_example_datasets_are_the_sample_files(path: Path) -> None:
    """Uploading examples/data/ as the README says is all an example needs."""
    for uri in _dataset_uris(_job_spec(example(path))):
        assert uri.startswith(DATASETS_PREFIX), uri
        name = uri[len(DATASETS_PREFIX) :]
        assert (EXAMPLES / "data" / name).is_file(), (
            f"{path.name} reads {uri}, but examples/data/{name} is missing"
        )


def test_sample_data_files_are_valid_for_the_trainer() -> None:
    # Imported here: the data package pulls in torch, which the other tests do not need.
    from kubetune_trainer.data.formats import detect_format, is_empty, validate
    from kubetune_trainer.data.readers import read_records

    seen = set()
    for path in DATA_FILES:
        records = read_records(path)
        assert 3 <= len(records) <= 20, f"{path.name}: a few records, enough to show the layout"
        fmt = detect_format(records[0])
        seen.add(fmt)
        assert path.stem.split("-")[0] == fmt, f"{path.name} holds {fmt} records"
        for record in records:
            assert detect_format(record) == fmt
            fields = validate(record, fmt)
            assert not is_empty(fields, fmt), f"{path.name}:{record.line} has nothing to learn"
    assert seen == {"text", "instruction", "chat", "completion"}


def test_client_rejects_with_field_and_fix() -> None:
    """A spot check of the client-side mirror; the full table runs against the API server too."""
    bad = {"spec": {**MINIMAL["FineTuneJob"], "resources": {"gpusPerNode": 0}, "method": {"type": "qlora"}}}
    with pytest.raises(InvalidManifestError) as err:
        load_finetunejob(bad)
    assert "spec.resources.gpusPerNode" in str(err.value)
    assert "set resources.gpusPerNode >= 1" in str(err.value)
