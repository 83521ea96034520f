"""DeepSpeed ZeRO-3 across two "nodes" (two torchrun agents, one CPU process each, separate output
directories standing in for separate disks): every node uploads its own shards, rank 0's
manifest covers both, both nodes resume from the S3 checkpoint, and a SIGTERM that reaches only
node 1 makes both nodes save the same step and stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubetune_trainer.storage import CheckpointStore, s3_client_from_env

pytestmark = [pytest.mark.s3, pytest.mark.slow]

NODE_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import deepspeed, torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from kubetune_trainer.callbacks import PreemptionCallback, S3CheckpointCallback
    from kubetune_trainer.storage import CheckpointStore

    phase, out, root, max_steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rank, node = int(os.environ["RANK"]), int(os.environ["GROUP_RANK"])
    deepspeed.init_distributed(dist_backend="gloo")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            ids = torch.arange(16) * (i + 1) % 64
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
          "steps_per_print": 10**9}
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=2, save_steps=2,
                             save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, ddp_backend="gloo",
                             deepspeed=ds, disable_tqdm=True, learning_rate=1e-3)
    store = CheckpointStore(root, node_poll_interval_s=0.2, node_wait_timeout_s=120)
    upload = S3CheckpointCallback(store, out, keep_last=2, node_rank=node, is_global_rank0=rank == 0, num_nodes=2,
                                  fail_on_error=True)
    preemption = PreemptionCallback()

    class SigtermOnNode1(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if phase == "resume" and rank == 1 and state.global_step + 1 == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    resume = None
    if phase == "resume":
        # Nothing uploads while nodes start, so every node sees the same newest checkpoint.
        resume = str(store.download(store.latest_complete(), out))
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[preemption, upload, SigtermOnNode1()])
    trainer.train(resume_from_checkpoint=resume)
    print("RESULT " + json.dumps({"rank": rank, "uploaded": upload.uploaded_steps, "step": trainer.state.global_step,
                                  "preempted": preemption.preempted}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(
    tmp_path: Path, s3_env: dict[str, str], phase: str, root: str, max_steps: int
) -> list[dict]:
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    port = free_port()
    env = {**os.environ, **s3_env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        out = tmp_path / f"{phase}-node{node}"
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(script),
            phase,
            str(out),
            root,
            str(max_steps),
        ]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    results = []
    for node, p in enumerate(procs):
        log, _ = p.communicate(timeout=400)
        assert p.returncode == 0, f"node {node} failed:\n{log[-6000:]}"
        results += [json.loads(line.split("RESULT ", 1)[1]) for line in log.splitlines() if "RESULT " in line]
    return sorted(results, key=lambda r: r["rank"])


def test_zero3_two_nodes_upload_manifest_and_resume(s3, s3_bucket: str, tmp_path: Path) -> None:
    root = f"s3://{s3_bucket}/kubetune/ns/zero3/uid/"
    store = CheckpointStore(root, client=s3_client_from_env(env=s3.env()))

    results = run_two_nodes(tmp_path, s3.env(), "train", root, max_steps=4)
    assert [r["uploaded"] for r in results] == [[2, 4], []]  # only global rank 0 completes checkpoints
    assert store.list_steps() == [2, 4] and store.latest_complete() == 4
    manifest = store.read_manifest(4)
    assert manifest is not None and manifest.num_nodes == 2 and manifest.world_size == 2
    by_node: dict[int, set[str]] = {0: set(), 1: set()}
    for f in manifest.files:
        by_node[f.node].add(f.path)
    # Each node's ZeRO-3 partition is in the manifest, attributed to the node that wrote it.
    assert any("zero_pp_rank_0" in p for p in by_node[0])
    assert any("zero_pp_rank_1" in p for p in by_node[1])
    assert "rng_state_1.pth" in by_node[1] and "rng_state_0.pth" in by_node[0]
    assert "trainer_state.json" in by_node[0]
    # Node 1's disk never held node 0's shards: the S3 checkpoint is the only complete copy.
    node1_files = {
        p.relative_to(tmp_path / "train-node1" / "checkpoint-4").as_posix()
        for p in (tmp_path / "train-node1" / "checkpoint-4").rglob("*")
        if p.is_file()
    }
    assert not any("zero_pp_rank_0" in p for p in node1_files)
    # The gathered 16-bit weights were written complete (not the empty ZeRO-3 placeholders).
    weights = [f for f in manifest.files if f.path.endswith(".safetensors")]
    assert weights and all(f.size > 10_000 for f in weights)

    # Resume from step 4 on fresh disks; at step 5 only node 1 gets SIGTERM.
    results = run_two_nodes(tmp_path, s3.env(), "resume", root, max_steps=8)
    assert [(r["step"], r["preempted"]) for r in results] == [(5, True), (5, True)]
    assert results[0]["uploaded"] == [5]  # the preemption save (save_steps=2 would not save 5)
    assert store.list_steps() == [4, 5] and store.latest_complete() == 5
    manifest = store.read_manifest(5)
    assert manifest is not None and any("zero_pp_rank_1" in f.path and f.node == 1 for f in manifest.files)
