"""The models as a Python API: loading manifests, defaults, error messages, round trips."""

from __future__ import annotations

import pytest

from kubetune_operator.api import (
    AdapterDeployment,
    FineTuneJob,
    FineTuneJobSpec,
    InvalidManifestError,
    load_adapterdeployment,
    load_finetunejob,
)
from kubetune_operator.api.common import QUANTITY, S3_URI, ModelSource
from kubetune_operator.api.finetunejob import Dataset, DataSource, Storage
from kubetune_trainer.apimodel import matches
from tests.unit.test_api_cases import adapterdeployment, finetunejob


def test_the_shortest_job_gets_documented_defaults() -> None:
    job = load_finetunejob(finetunejob())
    spec = job.spec
    assert spec.method.type == "lora" and spec.method.lora is None  # LoRA with the trainer's r=8, alpha=16
    assert (spec.hyperparameters.epochs, spec.hyperparameters.learning_rate) == (3, 2e-4)
    assert (spec.resources.nodes, spec.resources.gpus_per_node) == (1, 1)
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.distributed.strategy == "deepspeed" and spec.distributed.deepspeed is None
    assert spec.evaluation.metrics == ["perplexity"] and spec.evaluation.strategy == "auto"
    assert spec.checkpointing.keep_last == 3 and spec.run_policy.max_restarts == 3
    assert (
        spec.storage.secret_ref is not None
        and spec.storage.secret_ref.access_key_id_key == "AWS_ACCESS_KEY_ID"
    )
    assert spec.base_model.trust_remote_code is False
    assert job.status is None


def test_round_trip_through_the_wire_format_is_stable() -> None:
    manifest = load_finetunejob(finetunejob()).to_manifest()
    assert load_finetunejob(manifest).to_manifest() == manifest
    assert "status" not in manifest and "lora" not in manifest["spec"]["method"]  # no nulls on the wire
    served = load_adapterdeployment(adapterdeployment()).to_manifest()
    assert load_adapterdeployment(served).to_manifest() == served


def test_python_code_may_use_snake_case_but_manifests_may_not() -> None:
    spec = FineTuneJobSpec(
        base_model=ModelSource(uri="hf://Qwen/Qwen2.5-0.5B"),
        dataset=Dataset(train=DataSource(uri="data/train.jsonl")),
        storage=Storage(uri="s3://runs"),
    )
    assert FineTuneJob(spec=spec).to_manifest()["spec"]["baseModel"]["uri"] == "hf://Qwen/Qwen2.5-0.5B"
    manifest = finetunejob()
    manifest["spec"]["base_model"] = manifest["spec"].pop("baseModel")
    with pytest.raises(InvalidManifestError) as info:
        load_finetunejob(manifest)
    assert "spec.base_model: unknown field" in str(info.value)
    assert "spec.baseModel: Field required" in str(info.value)


def test_wrong_kind_or_version_is_rejected() -> None:
    with pytest.raises(InvalidManifestError, match=r"kubetune\.io/v1alpha1"):
        load_finetunejob({**finetunejob(), "apiVersion": "kubetune.io/v1"})
    with pytest.raises(InvalidManifestError, match="kind"):
        load_finetunejob(adapterdeployment())
    with pytest.raises(InvalidManifestError, match="expected a mapping"):
        load_finetunejob(["not", "a", "manifest"])  # type: ignore[arg-type]


def test_error_lists_every_problem_with_the_object_name() -> None:
    manifest = finetunejob("broken")
    manifest["spec"]["resources"] = {"nodes": 0, "gpusPerNode": 32}
    with pytest.raises(InvalidManifestError) as info:
        load_finetunejob(manifest)
    err = info.value
    assert err.kind == "FineTuneJob" and err.name == "broken"
    assert [path for path, _ in err.errors] == ["spec.resources.nodes", "spec.resources.gpusPerNode"]
    assert str(err).startswith('FineTuneJob "broken" is invalid:')


def test_json_types_are_strict_like_the_api_server() -> None:
    """ "true" is not a boolean and "3" is not an integer, for the API server and for the client."""
    manifest = finetunejob()
    manifest["spec"]["dataset"]["packing"] = "true"
    with pytest.raises(InvalidManifestError, match=r"spec\.dataset\.packing"):
        load_finetunejob(manifest)
    manifest = finetunejob()
    manifest["spec"]["hyperparameters"] = {"epochs": 2, "learningRate": 1}  # integers are numbers
    assert load_finetunejob(manifest).spec.hyperparameters.learning_rate == 1.0


def test_status_as_the_operator_and_trainer_write_it_loads() -> None:
    manifest = finetunejob()
    manifest["status"] = {
        "phase": "Running",
        "observedGeneration": 1,
        "attempt": 1,
        "workers": "1x1",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "PodsRunning",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "progress": {"step": 10, "totalSteps": 100, "percent": 10.0, "trainLoss": 2.5},
        "metrics": {"perplexity": 12.3},
    }
    job = load_finetunejob(manifest)
    assert job.status is not None and job.status.progress is not None and job.status.progress.percent == 10.0
    assert isinstance(load_adapterdeployment(adapterdeployment()), AdapterDeployment)


@pytest.mark.parametrize("value", ["1", "500m", "64Gi", "1.5", "2e3", "+1k", ".5", "16E", 8])
def test_quantity_pattern_accepts_kubernetes_quantities(value: object) -> None:
    assert matches(str(value), QUANTITY)


@pytest.mark.parametrize("value", ["", "64GB", "1 Gi", "lots", "Gi", "1.2.3", "64gi", "1Mi\n"])
def test_quantity_pattern_rejects_non_quantities(value: str) -> None:
    assert not matches(value, QUANTITY)


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("s3://bucket", True),
        ("s3://my.bucket-1/a/b/", True),
        ("s3://ab", False),  # buckets have at least 3 characters
        ("s3://Bucket/x", False),
        ("s3://bucket/with space", False),
        ("s3://bucket\n", False),  # RE2's `$` is the end of the text; the mirror must agree
        ("gs://bucket", False),
    ],
)
def test_storage_uri_format(uri: str, ok: bool) -> None:
    assert matches(uri, S3_URI) is ok
