"""baseModel.initAdapter -> the trainer's init_adapter (and the pvc:// mounts it needs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune_operator.convert import finetunejob_to_config, pvc_claims, to_config_dict
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.jobfile import load_job_file
from tests.unit.test_api_cases import finetunejob


def _with(init: dict) -> dict:
    ftj = finetunejob()
    ftj["metadata"]["namespace"] = "team-a"
    ftj["spec"]["baseModel"]["initAdapter"] = init
    return ftj


def test_an_adapter_uri_becomes_init_adapter_where_the_trainer_finds_it() -> None:
    assert to_config_dict(_with({"uri": "s3://runs/a/final/"}))["init_adapter"] == "s3://runs/a/final/"
    assert to_config_dict(_with({"uri": "hf://org/adapter"}))["init_adapter"] == "org/adapter"
    pvc = _with({"uri": "pvc://adapters/support/v3"})
    assert to_config_dict(pvc)["init_adapter"] == "/mnt/kubetune/adapters/support/v3"
    assert "adapters" in pvc_claims(pvc["spec"])  # mounted into the pods like a pvc:// model
    assert "init_adapter" not in to_config_dict(finetunejob())


def test_a_job_reference_is_resolved_by_the_operator_only(tmp_path: Path) -> None:
    ref = _with({"fineTuneJobRef": {"name": "task-1"}})
    resolved = to_config_dict(ref, init_adapter="s3://runs/team-a/task-1/uid/final/")
    assert resolved["init_adapter"] == "s3://runs/team-a/task-1/uid/final/"
    with pytest.raises(
        ValueError, match=r"set baseModel\.initAdapter\.uri to that job's status\.output\.adapterUri"
    ):
        finetunejob_to_config(ref, base_dir=tmp_path)
    local = finetunejob_to_config(_with({"uri": f"file://{tmp_path}/task-1"}), base_dir=tmp_path)
    assert local.init_adapter == f"{tmp_path}/task-1"
    # `kubetune run job.yaml --local` says the same as a configuration error (exit code 2).
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(ref))
    with pytest.raises(ConfigError, match=r"job\.yaml: baseModel\.initAdapter\.fineTuneJobRef \(task-1\)"):
        load_job_file(manifest)
