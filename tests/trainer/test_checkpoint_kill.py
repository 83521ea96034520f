"""kill -9 at any moment of a checkpoint upload never yields a checkpoint that resume would pick
and that is broken.

The upload runs in a real subprocess against SeaweedFS and is SIGKILLed either from inside, right
after its N-th object was written (deterministic points: before/after each data file, between the
node list and the manifest, after the manifest), or from outside after a delay (landing inside
multipart uploads and in-flight requests). Afterwards the newest complete checkpoint must be the
previous one or the new one, and it must download with every checksum right.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubetune_trainer.storage import CheckpointStore, RetryPolicy, s3_client_from_env

pytestmark = pytest.mark.s3

MB = 1024 * 1024

UPLOADER = textwrap.dedent(
    """
    import os, signal, sys
    from boto3.s3.transfer import TransferConfig
    from kubetune_trainer.storage import CheckpointStore

    root, local, step, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    written = 0

    def on_object(uri):
        global written
        written += 1
        print("wrote", uri.key, flush=True)
        if written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    store = CheckpointStore(
        root,
        transfer_config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, max_concurrency=2),
        on_object_written=on_object,
    )
    print("START", flush=True)
    store.upload(local, step, node_rank=0, write_manifest=True)
    print("DONE", flush=True)
    """
)


def make_checkpoint(root: Path, step: int) -> dict[str, bytes]:
    files = {
        "adapter_model.safetensors": os.urandom(300_000),
        "optimizer.pt": os.urandom(16 * MB),  # 4 multipart parts
        "trainer_state.json": f'{{"global_step": {step}}}'.encode(),
        "rng_state_0.pth": os.urandom(1000),
        f"global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(200_000),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


N_FILES = 5  # objects written: 5 files, then _nodes/node-0.json (6th), then manifest.json (7th)


@pytest.fixture
def setup(s3, s3_bucket: str, tmp_path: Path):
    root = f"s3://{s3_bucket}/kubetune/ns/job/uid/"
    store = CheckpointStore(root, client=s3_client_from_env(env=s3.env()), retry=RetryPolicy(attempts=2))
    previous = make_checkpoint(tmp_path / "checkpoint-100", 100)
    store.upload(tmp_path / "checkpoint-100", 100)
    new = make_checkpoint(tmp_path / "checkpoint-200", 200)
    script = tmp_path / "uploader.py"
    script.write_text(UPLOADER)
    env = {**os.environ, **s3.env()}

    def launch(kill_after: int, step: int = 200, local: str = "checkpoint-200") -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), root, str(tmp_path / local), str(step), str(kill_after)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    return store, launch, {100: previous, 200: new}, tmp_path


def assert_resume_safe(store: CheckpointStore, contents: dict[int, dict[str, bytes]], dest: Path) -> int:
    latest = store.latest_complete()
    assert latest in (100, 200), f"latest complete checkpoint is {latest}"
    path = store.download(latest, dest)  # verifies every sha256 against the manifest
    got = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert got == contents[latest]
    return latest


@pytest.mark.parametrize(
    ("kill_after", "expected"),
    [
        (1, 100),  # after the first data file
        (3, 100),  # in the middle (other files in flight)
        (N_FILES, 100),  # all data files, no node list
        (N_FILES + 1, 100),  # node list written, manifest not yet
        (N_FILES + 2, 200),  # right after the manifest
    ],
)
def test_kill_after_n_objects(setup, kill_after: int, expected: int) -> None:
    store, launch, contents, tmp_path = setup
    proc = launch(kill_after)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    assert out.count("wrote ") == kill_after, out
    assert assert_resume_safe(store, contents, tmp_path / "restore") == expected
    # The next successful save garbage-collects what the killed upload left behind.
    if expected == 100:
        make_checkpoint(tmp_path / "checkpoint-300", 300)
        store.upload(tmp_path / "checkpoint-300", 300)
        assert store.prune(keep_last=2).deleted == [200]
        assert store.list_steps() == [100, 300]


def test_kill_at_random_moments(setup) -> None:
    """SIGKILL from outside after growing delays: lands in multipart uploads and requests."""
    store, launch, contents, tmp_path = setup
    # How long does the upload itself (after interpreter start-up) take here?
    proc = launch(kill_after=0)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "START"
    started = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert "DONE" in out, out
    full = time.monotonic() - started
    store.delete(200)

    outcomes = []
    for i, fraction in enumerate((0.1, 0.3, 0.5, 0.7, 0.85, 0.95)):
        proc = launch(kill_after=0)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "START"
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        outcomes.append(assert_resume_safe(store, contents, tmp_path / f"restore-{i}"))
        if outcomes[-1] == 200:
            store.delete(200)  # start the next round from "only step 100 is complete" again
    print(f"full upload {full:.2f}s; latest complete after each kill: {outcomes}")


def test_kill_during_reupload_of_a_complete_step(setup) -> None:
    """Re-uploading a step (a retried attempt) drops its manifest first: a kill midway leaves the
    step incomplete, never complete-looking with mixed contents."""
    store, launch, _, tmp_path = setup
    replacement = make_checkpoint(tmp_path / "checkpoint-100-again", 100)
    proc = launch(kill_after=2, step=100, local="checkpoint-100-again")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    assert store.latest_complete() is None
    assert not store.status(100).complete
    proc = launch(kill_after=0, step=100, local="checkpoint-100-again")
    assert "DONE" in proc.communicate(timeout=60)[0]
    assert assert_resume_safe(store, {100: replacement}, tmp_path / "restore") == 100
