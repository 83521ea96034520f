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

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.quickstart import make_task_records, write_task_data
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


def _same_weights(model, checkpoint: Path) -> bool:
    """Whether ``model`` holds exactly the weights saved in a Trainer checkpoint (full fine-tuning)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    params = model.state_dict()
    assert saved and set(saved) <= set(params)
    return all(torch.equal(params[k].detach().cpu(), v) for k, v in saved.items())


@pytest.mark.s3
def test_best_checkpoint_survives_pruning_and_a_new_pod(
    s3, s3_bucket: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer.storage.resume import local_checkpoint_problem, restore_best_checkpoint

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rows = make_task_records(48, seed=3)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    job = {"namespace": "team-a", "name": "ft-best", "uid": "u-1"}
    base = {
        "model_name": str(tiny_model_dir),
        "train_file": str(tmp_path / "train.jsonl"),
        "validation_file": str(tmp_path / "val.jsonl"),
        "per_device_train_batch_size": 8,
        # Full fine-tuning (output layer included) at a learning rate so large that eval_loss gets
        # worse after the first evaluation: the best checkpoint is an early one. (LoRA on the tiny
        # model's frozen output layer cannot move the loss far enough to get reliably worse.)
        "method": "full",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "eval_steps": 2,
        "save_steps": 2,
        "keep_last": 1,
        "storage_uri": f"s3://{s3_bucket}/runs",
        "job": job,
        "progress_bar": False,
        # At lr 1.0 the eval_loss is a random walk above its first value; with seed 1 every later
        # evaluation is far worse than step 2's (47 -> 92, 95, 107), with seed 0 step 8 came back
        # down to 45 once the attention kernels changed (fast_paths): the scenario needs a margin.
        "seed": 1,
    }
    store = CheckpointStore(f"s3://{s3_bucket}/runs/team-a/ft-best/u-1/")

    pod1 = ModelFinetuner(FinetuningConfig(**base, output_dir=str(tmp_path / "pod1"), max_steps=6))
    try:
        pod1.train()
    finally:
        pod1.close()
    evals = [(h["step"], h["eval_loss"]) for h in pod1.trainer.state.log_history if "eval_loss" in h]
    best = store.best_step(6)
    assert best is not None and best < 6, evals  # the setup this test needs
    # keep_last=1 keeps the newest; the best is kept as well.
    assert store.complete_steps() == [best, 6]

    # What a new pod does before training: restore the newest and the best checkpoint, and point
    # best_model_checkpoint (pod 1's absolute path) at the local copy.
    probe = tmp_path / "probe"
    restored = store.restore_latest(probe)
    assert restored is not None and restored[0] == 6
    assert restore_best_checkpoint(store, probe, restored[1]) == probe / f"checkpoint-{best}"
    assert local_checkpoint_problem(probe / f"checkpoint-{best}", deepspeed=False) is None
    state = json.loads((restored[1] / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(probe / f"checkpoint-{best}")

    # A new pod with an empty disk (a preempted job's next attempt) resumes at step 6 and, at the
    # end, reloads the best checkpoint, not the last one.
    pod2 = ModelFinetuner(FinetuningConfig(**base, output_dir=str(tmp_path / "pod2"), max_steps=8))
    try:
        pod2.train()
    finally:
        pod2.close()
    best_dir = tmp_path / "pod2" / "checkpoints" / f"checkpoint-{best}"
    evals2 = [(h["step"], h["eval_loss"]) for h in pod2.trainer.state.log_history if "eval_loss" in h]
    assert pod2.trainer.state.best_model_checkpoint == str(best_dir), (evals, evals2)
    assert _same_weights(pod2.model, best_dir)
    assert store.complete_steps() == [best, 8]
    assert not _same_weights(pod2.model, store.download(8, tmp_path / "last"))
