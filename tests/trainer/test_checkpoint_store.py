"""The checkpoint protocol against a real SeaweedFS: manifest last, completeness, checksums, pruning,
several nodes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from kubetune_trainer.storage import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointIncompleteError,
    CheckpointNotFoundError,
    CheckpointStore,
    ChecksumMismatchError,
    FileEntry,
    Manifest,
    RetryPolicy,
    S3Uri,
    merge_node_lists,
    s3_client_from_env,
)

MB = 1024 * 1024
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=4)


def write_checkpoint(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def hf_checkpoint(tmp_path: Path, step: int, seed: int = 0) -> tuple[Path, dict[str, bytes]]:
    """Files shaped like a Trainer checkpoint saved by rank 0 with DeepSpeed."""
    rnd = os.urandom
    files = {
        "adapter_model.safetensors": rnd(200_000 + seed),
        "adapter_config.json": json.dumps({"r": 8, "seed": seed}).encode(),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
        "rng_state_0.pth": rnd(1500),
        f"global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt": rnd(50_000),
        "latest": f"global_step{step}".encode(),
    }
    return write_checkpoint(tmp_path / f"node0-checkpoint-{step}-{seed}", files), files


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def store(s3, s3_bucket: str) -> CheckpointStore:
    return CheckpointStore(
        f"s3://{s3_bucket}/kubetune/ns1/job1/uid-123/",
        client=s3_client_from_env(env=s3.env()),
        transfer_config=SMALL_PARTS,
        retry=RetryPolicy(attempts=3, base_delay_s=0.1),
        node_poll_interval_s=0.1,
        node_wait_timeout_s=20,
    )


# -- pure parts ------------------------------------------------------------------------------------


def entry(path: str, data: bytes) -> FileEntry:
    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest())


def test_merge_node_lists_dedupes_identical_and_rejects_different_files() -> None:
    merged = merge_node_lists(
        {
            1: [entry("rng_state_1.pth", b"b"), entry("zero_to_fp32.py", b"same")],
            0: [entry("rng_state_0.pth", b"a"), entry("zero_to_fp32.py", b"same")],
        }
    )
    assert [(f.path, f.node) for f in merged] == [
        ("rng_state_0.pth", 0),
        ("rng_state_1.pth", 1),
        ("zero_to_fp32.py", 0),
    ]
    with pytest.raises(
        CheckpointConflictError, match=r"'trainer_state.json' differs between node 0 .* and node 1"
    ):
        merge_node_lists({0: [entry("trainer_state.json", b"x")], 1: [entry("trainer_state.json", b"y")]})


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(format="other"), "field 'format'"),
        (lambda d: d.update(step=-1), "field 'step'"),
        (lambda d: d.update(world=None), "world.numNodes"),
        (lambda d: d["files"][0].update(path="../x"), "files[0].path"),
        (lambda d: d["files"][0].update(size="10"), "files[0].size"),
        (lambda d: d["files"][0].update(sha256="abc"), "files[0].sha256"),
    ],
)
def test_manifest_validation_names_the_field(mutate, fragment: str) -> None:
    good = Manifest(
        step=3,
        created_at="t",
        num_nodes=1,
        world_size=2,
        files=tuple(merge_node_lists({0: [entry("a.bin", b"1")]})),
    ).to_json()
    assert Manifest.from_json(json.loads(json.dumps(good)), "m").files[0].path == "a.bin"
    mutate(good)
    with pytest.raises(
        CheckpointError,
        match=f"s3://x/manifest.json is not a valid checkpoint manifest: .*{re.escape(fragment)}",
    ):
        Manifest.from_json(good, "s3://x/manifest.json")


# -- against SeaweedFS -------------------------------------------------------------------------------


@pytest.mark.s3
def test_upload_writes_manifest_last_and_download_verifies(store: CheckpointStore, tmp_path: Path) -> None:
    local, files = hf_checkpoint(tmp_path, 10)
    files["big.bin"] = os.urandom(11 * MB)  # multipart
    (local / "big.bin").write_bytes(files["big.bin"])
    written: list[str] = []
    store.on_object_written = lambda uri: written.append(uri.key)
    assert store.latest_complete() is None

    result = store.upload(local, 10, node_rank=0, write_manifest=True, world_size=1)

    prefix = store.checkpoint_uri(10).key
    assert written[-1] == prefix + "manifest.json"
    assert written[-2] == prefix + "_nodes/node-0.json"
    assert sorted(written[:-2]) == sorted(prefix + p for p in files)
    assert result.manifest is not None and result.bytes == sum(len(d) for d in files.values())
    manifest = store.read_manifest(10)
    assert manifest is not None
    assert {f.path: (f.size, f.sha256) for f in manifest.files} == {
        p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()
    }
    assert (manifest.step, manifest.num_nodes, manifest.world_size) == (10, 1, 1)
    assert store.latest_complete() == 10

    path = store.download(10, tmp_path / "restore")
    assert path == tmp_path / "restore" / "checkpoint-10"
    assert tree(path) == files  # no _nodes/ or manifest.json in a restored checkpoint
    assert [p.name for p in (tmp_path / "restore").iterdir()] == ["checkpoint-10"]


@pytest.mark.s3
def test_incomplete_and_broken_checkpoints_are_never_picked(
    s3, store: CheckpointStore, tmp_path: Path
) -> None:
    client = s3_client_from_env(env=s3.env())
    store.upload(hf_checkpoint(tmp_path, 1)[0], 1)
    store.upload(hf_checkpoint(tmp_path, 2)[0], 2)
    # No manifest: node files were uploaded but global rank 0 never finished.
    store.upload(hf_checkpoint(tmp_path, 3)[0], 3, write_manifest=False)
    assert store.latest_complete() == 2
    assert "no manifest.json" in (store.status(3).problem or "")
    with pytest.raises(
        CheckpointNotFoundError, match=r"checkpoint-3/ has no manifest.json.*complete checkpoints: \[1, 2\]"
    ):
        store.download(3, tmp_path / "r")

    # A manifest-listed object disappeared: step 2 is broken.
    bucket, key2 = store.root.bucket, store.checkpoint_uri(2).join("rng_state_0.pth").key
    client.delete_object(Bucket=bucket, Key=key2)
    assert store.latest_complete() == 1
    assert "rng_state_0.pth (missing)" in (store.status(2).problem or "")
    # A listed object has the wrong size: step 1 is broken too.
    key1 = store.checkpoint_uri(1).join("latest").key
    client.put_object(Bucket=bucket, Key=key1, Body=b"truncated")
    assert store.latest_complete() is None
    assert "latest (9 bytes, expected 12)" in (store.status(1).problem or "")
    with pytest.raises(CheckpointIncompleteError, match="broken"):
        store.download(1, tmp_path / "r")
    # Garbage manifest: reported, never picked.
    client.put_object(Bucket=bucket, Key=store.checkpoint_uri(2).join("manifest.json").key, Body=b"{nope")
    assert not store.status(2).complete and "not valid JSON" in (store.status(2).problem or "")


@pytest.mark.s3
def test_checksum_mismatch_fails_download_and_restore_falls_back(
    s3, store: CheckpointStore, tmp_path: Path
) -> None:
    store.upload(hf_checkpoint(tmp_path, 5, seed=1)[0], 5)
    local6, _ = hf_checkpoint(tmp_path, 6, seed=2)
    store.upload(local6, 6)
    # Same size, different bytes: only the sha256 can tell.
    key = store.checkpoint_uri(6).join("adapter_model.safetensors").key
    size = (local6 / "adapter_model.safetensors").stat().st_size
    s3_client_from_env(env=s3.env()).put_object(Bucket=store.root.bucket, Key=key, Body=b"\0" * size)
    assert store.latest_complete() == 6
    with pytest.raises(
        ChecksumMismatchError, match=r"adapter_model.safetensors downloaded with sha256 .* manifest records"
    ):
        store.download(6, tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoint-6").exists()
    assert list((tmp_path / "r").iterdir()) == []  # no partial directory left behind

    step, path = store.restore_latest(tmp_path / "r2") or (None, None)
    assert step == 5 and path == tmp_path / "r2" / "checkpoint-5"
    assert json.loads((path / "trainer_state.json").read_text()) == {"global_step": 5}


@pytest.mark.s3
def test_prune_keeps_newest_and_collects_garbage(store: CheckpointStore, tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        store.upload(hf_checkpoint(tmp_path, step)[0], step)
    store.upload(hf_checkpoint(tmp_path, 15)[0], 15, write_manifest=False)  # killed upload, older
    store.upload(hf_checkpoint(tmp_path, 50)[0], 50, write_manifest=False)  # may be in progress: keep
    # A deletion killed right after the manifest went: incomplete, must be collected.
    store.client.delete_object(
        Bucket=store.root.bucket, Key=store.checkpoint_uri(20).join("manifest.json").key
    )

    result = store.prune(keep_last=2)

    assert result.deleted == [10, 15, 20]
    assert result.kept == [30, 40]
    assert store.list_steps() == [30, 40, 50]
    assert store.latest_complete() == 40
    assert store.prune(keep_last=2).deleted == []
    assert store.discard_incomplete(after_step=40) == [50]
    assert store.list_steps() == [30, 40]
    with pytest.raises(CheckpointError, match="keepLast"):
        store.prune(keep_last=0)


def test_best_step_from_trainer_state() -> None:
    from kubetune_trainer.storage import best_step_from_state

    assert best_step_from_state({"best_global_step": 20, "best_model_checkpoint": "/x/checkpoint-30"}) == 20
    assert best_step_from_state({"best_model_checkpoint": "/old-pod/out/checkpoints/checkpoint-30"}) == 30
    assert best_step_from_state({"best_model_checkpoint": "checkpoint-7/"}) == 7
    for doc in (
        {},
        {"best_global_step": None, "best_model_checkpoint": None},
        {"best_model_checkpoint": "/x/y"},
        [],
    ):
        assert best_step_from_state(doc) is None


def _with_best(tmp_path: Path, step: int, best: int | None) -> Path:
    d, _ = hf_checkpoint(tmp_path, step)
    state = {"global_step": step, "best_metric": 1.5}
    if best is not None:  # as transformers writes it: the absolute path on the pod that trained
        state |= {
            "best_global_step": best,
            "best_model_checkpoint": f"/old-pod/out/checkpoints/checkpoint-{best}",
        }
    (d / "trainer_state.json").write_text(json.dumps(state))
    return d


@pytest.mark.s3
def test_prune_never_deletes_the_best_checkpoint(store: CheckpointStore, tmp_path: Path) -> None:
    for step in (10, 20, 30):
        store.upload(_with_best(tmp_path, step, best=10), step)
        store.prune(keep_last=1)
    assert store.complete_steps() == [10, 30]  # 20 went; 10 is the best

    store.upload(_with_best(tmp_path, 40, best=40), 40)  # a new best: the old one may go
    result = store.prune(keep_last=1)
    assert (result.deleted, result.kept, result.best) == ([10, 30], [40], 40)

    store.upload(_with_best(tmp_path, 50, best=None), 50)  # no best model tracked: plain keep_last
    assert store.prune(keep_last=1).kept == [50]
    assert store.complete_steps() == [50]


@pytest.mark.s3
def test_two_nodes_one_manifest(store: CheckpointStore, tmp_path: Path) -> None:
    """Node 1 uploads later than node 0; rank 0 waits for its file list and covers both."""
    node0 = write_checkpoint(
        tmp_path / "n0",
        {
            "adapter_model.safetensors": b"weights",
            "trainer_state.json": b"{}",
            "rng_state_0.pth": b"r0",
            "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o0",
            "zero_to_fp32.py": b"script",
        },
    )
    node1 = write_checkpoint(
        tmp_path / "n1",
        {
            "rng_state_1.pth": b"r1",
            "global_step7/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"o1",
            "zero_to_fp32.py": b"script",  # identical on both nodes: allowed
        },
    )
    errors: list[BaseException] = []

    def node1_upload() -> None:
        time.sleep(1.0)
        try:
            store.upload(node1, 7, node_rank=1, write_manifest=False, num_nodes=2)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=node1_upload)
    t.start()
    result = store.upload(node0, 7, node_rank=0, write_manifest=True, num_nodes=2, world_size=2)
    t.join()
    assert not errors
    assert result.manifest is not None
    assert {f.path: f.node for f in result.manifest.files} == {
        "adapter_model.safetensors": 0,
        "trainer_state.json": 0,
        "rng_state_0.pth": 0,
        "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "zero_to_fp32.py": 0,
        "rng_state_1.pth": 1,
        "global_step7/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }
    assert store.latest_complete() == 7
    restored = tree(store.download(7, tmp_path / "r"))
    assert restored == {**tree(node1), **tree(node0)}


@pytest.mark.s3
def test_multi_node_failures_leave_no_manifest(store: CheckpointStore, tmp_path: Path) -> None:
    node0 = write_checkpoint(
        tmp_path / "n0", {"trainer_state.json": b'{"step": 1}', "rng_state_0.pth": b"r0"}
    )
    node1 = write_checkpoint(
        tmp_path / "n1", {"trainer_state.json": b'{"step": 2}', "rng_state_1.pth": b"r1"}
    )
    store.node_wait_timeout_s = 1.0
    # Node 1 never reports.
    with pytest.raises(
        CheckpointIncompleteError, match=r"node\(s\) \[1\] did not upload their file lists within 1s"
    ):
        store.upload(node0, 1, node_rank=0, num_nodes=2)
    assert store.read_manifest(1) is None
    # Both nodes wrote a different trainer_state.json under the same name.
    store.upload(node1, 2, node_rank=1, write_manifest=False, num_nodes=2)
    with pytest.raises(CheckpointConflictError, match=r"trainer_state\.json"):
        store.upload(node0, 2, node_rank=0, num_nodes=2)
    assert store.latest_complete() is None
    # A node list from another attempt (run id) is not merged.
    store.run_id = "attempt-1"
    store.upload(node1, 3, node_rank=1, write_manifest=False, num_nodes=2)
    store.run_id = "attempt-2"
    with pytest.raises(CheckpointIncompleteError, match=r"\[1\] did not upload"):
        store.upload(node0, 3, node_rank=0, num_nodes=2)


@pytest.mark.s3
def test_bad_arguments_are_explained(store: CheckpointStore, tmp_path: Path) -> None:
    local, _ = hf_checkpoint(tmp_path, 1)
    with pytest.raises(CheckpointError, match="only node 0"):
        store.upload(local, 1, node_rank=1, write_manifest=True, num_nodes=2)
    with pytest.raises(CheckpointError, match=r"node_rank 2 is outside 0..1"):
        store.upload(local, 1, node_rank=2, write_manifest=False, num_nodes=2)
    with pytest.raises(CheckpointError, match="non-negative integer"):
        store.upload(local, -1)
    (local / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="reserved"):
        store.upload(local, 1)
    with pytest.raises(Exception, match="checkpoint root URI 'bucket-only' has no scheme"):
        CheckpointStore("bucket-only")


@pytest.mark.s3
def test_reupload_of_a_step_replaces_it(store: CheckpointStore, tmp_path: Path) -> None:
    first, _ = hf_checkpoint(tmp_path, 4, seed=1)
    second, files = hf_checkpoint(tmp_path, 4, seed=2)
    store.upload(first, 4)
    seen_complete: list[int | None] = []
    # While the second upload runs, the old manifest must no longer vouch for step 4.
    store.on_object_written = lambda uri: (
        seen_complete.append(store.latest_complete())
        if "_nodes" not in uri.key and "manifest" not in uri.key
        else None
    )
    store.upload(second, 4)
    assert seen_complete and set(seen_complete) == {None}
    assert tree(store.download(4, tmp_path / "r")) == files


@pytest.mark.s3
def test_final_output_and_documents(store: CheckpointStore, tmp_path: Path) -> None:
    first = write_checkpoint(
        tmp_path / "f1", {"adapter_model.safetensors": b"1", "merged/model.safetensors": b"m"}
    )
    second = write_checkpoint(
        tmp_path / "f2", {"adapter_model.safetensors": b"2", "adapter_config.json": b"{}"}
    )
    store.upload_final(first)
    entries = store.upload_final(second)  # a retried attempt: stale files of the first must go
    assert sorted(e.path for e in entries) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = {
        o["Key"]
        for o in store.client.list_objects_v2(Bucket=store.root.bucket, Prefix=store.final_uri.key)[
            "Contents"
        ]
    }
    assert keys == {
        store.final_uri.key + "adapter_config.json",
        store.final_uri.key + "adapter_model.safetensors",
    }
    uri = store.write_json("metrics.json", {"eval_loss": 1.5})
    assert uri == S3Uri(store.root.bucket, store.root.key + "metrics.json")
    assert store.read_json("metrics.json") == {"eval_loss": 1.5}
    assert store.read_json("absent.json") is None
    with pytest.raises(CheckpointError, match="relative path"):
        store.write_json("../escape.json", {})
