"""A training pod's life against real S3 (SeaweedFS): preemption, resume in a new pod, final upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.quickstart import write_task_data
from kubetune_trainer.storage import CheckpointStore


class _Pod:
    """`python -m kubetune_trainer train --config FILE` with the S3 environment a pod gets."""

    def __init__(self, config: dict, workdir: Path, env: dict[str, str]):
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env, "DS_ACCELERATOR": "cpu"},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never saw {text!r}; output:\n{self.output[-5000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.mark.s3
@pytest.mark.slow
def test_preempted_pod_uploads_a_checkpoint_and_the_next_pod_resumes_and_uploads_the_adapter(
    s3, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_task_data(tmp_path / "data")
    job = {"namespace": "team-a", "name": "ft-colours", "uid": "1234-abcd"}
    base = {
        "model_name": str(tiny_model_dir),
        "train_file": str(data["train"]),
        "validation_file": str(data["validation"]),
        "per_device_train_batch_size": 4,
        "learning_rate": 0.003,
        "save_steps": 100000,  # only the preemption saves in the first pod
        "keep_last": 2,
        "storage_uri": f"s3://{s3_bucket}/runs",
        "job": job,
        "progress_bar": False,
        "logging_steps": 1,
    }
    root = f"s3://{s3_bucket}/runs/team-a/ft-colours/1234-abcd/"
    os.environ.update(s3.env())  # the store below reads the same standard boto3 variables
    store = CheckpointStore(root)

    # Pod 1: SIGTERM while training -> checkpoint saved and uploaded, exit 143.
    (tmp_path / "pod1").mkdir()
    pod1 = _Pod(
        {**base, "output_dir": str(tmp_path / "pod1" / "out"), "max_steps": 100000},
        tmp_path / "pod1",
        s3.env(),
    )
    pod1.wait_for(" loss=")  # the first optimizer steps are done
    pod1.proc.send_signal(signal.SIGTERM)
    assert pod1.wait() == 143, pod1.output[-5000:]
    step = store.latest_complete()
    assert step is not None and step > 0, pod1.output[-3000:]

    # Pod 2: a fresh disk; resumes from S3, finishes, uploads the final adapter and metrics.
    (tmp_path / "pod2").mkdir()
    pod2 = _Pod(
        {**base, "output_dir": str(tmp_path / "pod2" / "out"), "max_steps": step + 2},
        tmp_path / "pod2",
        s3.env(),
    )
    assert pod2.wait() == 0, pod2.output[-5000:]
    assert "resuming from checkpoint" in pod2.output and f"checkpoint-{step}" in pod2.output
    state = json.loads(
        (tmp_path / "pod2" / "out" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == step

    client = s3.client()
    final = {
        o["Key"].split("/final/", 1)[1]
        for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/team-a/ft-colours/1234-abcd/final/")[
            "Contents"
        ]
    }
    assert {"adapter_config.json", "adapter_model.safetensors", "provenance.json", "tokenizer.json"} <= final
    assert not any(k.startswith("checkpoints/") for k in final)
    metrics = json.loads(
        client.get_object(Bucket=s3_bucket, Key="runs/team-a/ft-colours/1234-abcd/metrics.json")[
            "Body"
        ].read()
    )
    assert "eval_loss" in metrics["eval"]
    assert len(store.complete_steps()) <= 2  # keep_last
