"""What a training pod tells the operator: the termination message (report on success, error otherwise).

The end-to-end tests run `python -m kubetune_trainer train --config FILE` as a pod does, with
s3:// data on a real S3 server (SeaweedFS) and the report file the kubelet would read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kubetune_trainer import artifacts, pod
from kubetune_trainer.exit_codes import ExitCode
from kubetune_trainer.quickstart import make_task_records

# ----------------------------------------------------------------------------- the message file


@pytest.fixture
def message_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(path))
    monkeypatch.delenv("RANK", raising=False)
    return path


def test_the_first_error_wins(message_file: Path) -> None:
    # torchrun SIGTERMs the other workers after one fails: their message must not hide the cause.
    assert pod.write_error("train.jsonl, line 3, field 'output': expected a string") == message_file
    assert pod.write_error("stopped by SIGTERM at step 4 after saving a checkpoint") is None
    assert message_file.read_text() == "train.jsonl, line 3, field 'output': expected a string"


def test_a_long_error_keeps_its_end(message_file: Path) -> None:
    pod.write_error("x" * 10_000 + " the actual reason")
    text = message_file.read_text()
    assert len(text) == pod.MAX_MESSAGE and text.endswith("the actual reason")


def test_unexpected_errors_name_their_type() -> None:
    assert pod.error_message(KeyError("lm_head"), expected=False) == "KeyError: 'lm_head'"
    assert pod.error_message(ValueError("bad value; fix: x"), expected=True) == "bad value; fix: x"
    assert pod.error_message(RuntimeError(), expected=False) == "RuntimeError"


def test_only_global_rank0_writes_the_report(message_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert pod.write_report({"adapterUri": "s3://b/final/"}) is None
    assert not message_file.exists()
    monkeypatch.setenv("RANK", "0")
    assert pod.write_report({"adapterUri": "s3://b/final/"}) == message_file
    assert json.loads(message_file.read_text()) == {"adapterUri": "s3://b/final/"}


def test_an_oversized_report_drops_the_metrics_not_the_uris(message_file: Path) -> None:
    doc = {
        "adapterUri": "s3://b/final/",
        "trainableParameters": 8,
        "metrics": {f"m{i}": 1.0 for i in range(400)},
    }
    pod.write_report(doc)
    assert json.loads(message_file.read_text()) == {"adapterUri": "s3://b/final/", "trainableParameters": 8}


def test_metrics_are_finite_numbers_only() -> None:
    got = pod.scalar_metrics(
        {"eval_loss": 1.5, "epoch": 2.0, "eval_confusion_matrix": {"labels": []}, "eval_nan": float("nan")},
        {"test_exact_match": 1, "test_flag": True},
    )
    assert got == {"eval_loss": 1.5, "test_exact_match": 1.0}


# ----------------------------------------------------------------------------- what was saved


def _peft_save(tiny_model_dir: Path, out: Path, peft_config) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), peft_config)
    model.save_pretrained(str(out))
    return out


def test_the_saved_output_reports_the_rank_peft_wrote_not_the_config(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    lora = _peft_save(tiny_model_dir, tmp_path / "lora", LoraConfig(r=12, task_type="CAUSAL_LM"))
    # The method comes from the run (qlora and lora write the same PEFT type); the rank from the file.
    assert artifacts.saved_output(lora, "lora") == {"method": "lora", "rank": 12}
    assert artifacts.saved_output(lora, "qlora") == {"method": "qlora", "rank": 12}
    prefix = _peft_save(
        tiny_model_dir, tmp_path / "prefix", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    assert artifacts.saved_output(prefix, "prefix") == {"method": "prefix"}
    prompt = _peft_save(
        tiny_model_dir, tmp_path / "prompt", PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    assert artifacts.saved_output(prompt, "prompt") == {"method": "prompt"}
    # A full fine-tune saves a whole model; an empty directory reports nothing rather than a guess.
    assert artifacts.saved_output(tiny_model_dir, "full") == {"method": "full"}
    assert artifacts.saved_output(tmp_path, "lora") == {}


# ----------------------------------------------------------------------------- a pod's run


def _put_jsonl(client, bucket: str, key: str, rows: list[dict]) -> str:
    client.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    return f"s3://{bucket}/{key}"


def _train(config: dict, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
        env={**os.environ, **env, "DS_ACCELERATOR": "cpu"},
    )


@pytest.mark.s3
@pytest.mark.slow
def test_a_pod_trains_on_s3_data_and_reports_the_uploaded_adapter(
    s3, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    client = s3.client()
    rows = make_task_records(48, seed=5)
    train = _put_jsonl(client, s3_bucket, "data/train.jsonl", rows[:32])
    val = _put_jsonl(client, s3_bucket, "data/val.jsonl", rows[32:40])
    test = _put_jsonl(client, s3_bucket, "data/test.jsonl", rows[40:])
    report_file = tmp_path / "termination-log"
    config = {
        "model_name": str(tiny_model_dir),
        "train_file": train,
        "validation_file": val,
        "test_file": test,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "metrics": ["perplexity", "exact_match"],
        "eval_max_examples": 4,
        "merge_adapter": True,
        "lora": {"r": 4},
        "storage_uri": f"s3://{s3_bucket}/runs",
        "job": {"namespace": "team-a", "name": "ft-pod", "uid": "u-1"},
        "progress_bar": False,
    }
    res = _train(config, tmp_path, {**s3.env(), "KUBETUNE_TERMINATION_MESSAGE_PATH": str(report_file)})
    assert res.returncode == 0, res.stderr[-4000:]

    report = json.loads(report_file.read_text())
    root = f"s3://{s3_bucket}/runs/team-a/ft-pod/u-1/"
    assert report["adapterUri"] == root + "final/"
    assert report["mergedUri"] == root + "final/merged/"
    assert 0 < report["trainableParameters"] < report["totalParameters"]
    assert (report["method"], report["rank"]) == ("lora", 4)  # as saved in adapter_config.json
    assert {"eval_loss", "eval_perplexity", "eval_exact_match", "test_loss", "test_exact_match"} <= set(
        report["metrics"]
    )
    assert all(isinstance(v, float) for v in report["metrics"].values())

    def keys(uri: str) -> set[str]:
        prefix = uri.removeprefix(f"s3://{s3_bucket}/")
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"].removeprefix(prefix) for o in listing}

    assert {"adapter_config.json", "adapter_model.safetensors", "provenance.json"} <= keys(
        report["adapterUri"]
    )
    assert "model.safetensors" in keys(report["mergedUri"])
    # The provenance names the data by the URIs the user gave, not the pod's local copies.
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert set(provenance["datasets"]) == {train, val, test}


@pytest.mark.s3
def test_bad_s3_data_exits_3_and_the_message_names_the_uri_line_and_field(
    s3, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    client = s3.client()
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 7}]
    train = _put_jsonl(client, s3_bucket, "data/train.jsonl", rows)
    report_file = tmp_path / "termination-log"
    config = {"model_name": str(tiny_model_dir), "train_file": train, "output_dir": str(tmp_path / "out")}
    res = _train(config, tmp_path, {**s3.env(), "KUBETUNE_TERMINATION_MESSAGE_PATH": str(report_file)})

    assert res.returncode == ExitCode.BAD_DATA, res.stderr[-4000:]
    message = report_file.read_text()
    assert message.startswith(f"{train}, line 2, field 'output'"), message
    assert "Fix:" in message and "Traceback" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_qlora_on_a_cpu_machine_exits_4_before_any_work(tmp_path: Path) -> None:
    # Neither the model directory nor the data file exists: the hardware check comes first.
    config = {
        "model_name": str(tmp_path / "no-such-model"),
        "train_file": str(tmp_path / "no-such-data.jsonl"),
        "method": "qlora",
        "output_dir": str(tmp_path / "out"),
    }
    report_file = tmp_path / "termination-log"
    res = _train(config, tmp_path, {"KUBETUNE_TERMINATION_MESSAGE_PATH": str(report_file)})
    assert res.returncode == ExitCode.UNSUPPORTED_HARDWARE, res.stderr[-4000:]
    message = report_file.read_text()
    assert "'qlora' needs a CUDA GPU" in message and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
