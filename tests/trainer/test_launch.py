"""The pod launcher keeps the trainer's exit code, which plain torchrun turns into 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_trainer.exit_codes import ExitCode
from kubetune_trainer.launch import (
    GRACE_ENV,
    TORCH_SHUTDOWN_ENV,
    configured_shutdown_timeout,
    exit_code,
    shutdown_timeout,
)


def test_a_bad_config_exits_2_through_the_launcher_not_torchruns_1(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    argv = ["-m", "kubetune_trainer.launch", "--standalone", "--nproc-per-node=1"]
    proc = subprocess.run(
        [sys.executable, *argv, "-m", "kubetune_trainer", "train", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == ExitCode.BAD_CONFIG, proc.stderr[-3000:]
    assert f"config file {missing} does not exist" in proc.stderr


def test_a_worker_killed_by_a_signal_is_reported_like_a_shell_would() -> None:
    assert exit_code(-9) == 137 and exit_code(-15) == 143
    assert exit_code(3) == 3


# ---- SIGTERM: the workers get the pod's grace period, not torchrun's 30 s ------------------------

WORKER = """
import os, signal, sys, time
from pathlib import Path

out, save_seconds = Path(sys.argv[1]), float(sys.argv[2])

def stop(signum, frame):
    time.sleep(save_seconds)  # saving and uploading a checkpoint
    (out / "saved").write_text("ok")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
(out / "ready").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""

# Forces the path for a torch without --shutdown-timeout (the trainer image's 2.7) on this one.
OLD_TORCH_LAUNCHER = (
    "import sys, kubetune_trainer.launch as launch; "
    "launch._torch_has_shutdown_timeout = lambda: False; sys.exit(launch.main(sys.argv[1:]))"
)


def _stop_during_a_save(tmp_path: Path, grace: int, *, old_torch: bool = False) -> tuple[int, bool]:
    """Start the launcher with a worker that needs 3 s to save after SIGTERM, then SIGTERM it."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launcher = ["-c", OLD_TORCH_LAUNCHER] if old_torch else ["-m", "kubetune_trainer.launch"]
    env = {k: v for k, v in os.environ.items() if k != TORCH_SHUTDOWN_ENV}
    env[GRACE_ENV] = str(grace)
    proc = subprocess.Popen(
        [sys.executable, *launcher, "--standalone", "--nproc-per-node=1", str(worker), str(tmp_path), "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what the kubelet does (the launcher is the container's PID 1)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, (tmp_path / "saved").exists()


def test_after_sigterm_workers_get_the_pods_grace_period_to_save(tmp_path: Path) -> None:
    # 20 s of grace: 18 s for the workers; the 3 s save completes and the pod says "preempted".
    assert _stop_during_a_save(tmp_path, grace=20) == (ExitCode.PREEMPTED, True)


@pytest.mark.parametrize("old_torch", [False, True], ids=["torch-setting", "older-torch"])
def test_the_grace_period_is_what_decides_not_torchruns_default(tmp_path: Path, old_torch: bool) -> None:
    # 1 s of grace: torchrun's default 30 s would let the 3 s save finish; the grace period does not.
    code, saved = _stop_during_a_save(tmp_path, grace=1, old_torch=old_torch)
    assert not saved
    assert code == ExitCode.PREEMPTED  # still "stopped by SIGTERM", retried from the last checkpoint


def test_shutdown_timeout_leaves_a_margin_and_explicit_settings_win() -> None:
    assert shutdown_timeout(300) == 290 and shutdown_timeout(30) == 27 and shutdown_timeout(1) == 1
    assert configured_shutdown_timeout({GRACE_ENV: "300"}) == 290
    assert configured_shutdown_timeout({GRACE_ENV: "300", TORCH_SHUTDOWN_ENV: "120"}) == 120
    assert configured_shutdown_timeout({GRACE_ENV: "soon"}) is None
    assert configured_shutdown_timeout({}) is None


def test_the_operators_multi_node_command_waits_1800s_at_a_static_rendezvous(monkeypatch) -> None:
    """What torchrun makes of the command the operator renders for a 2-node FineTuneJob."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import create_rdzv_handler
    from torch.distributed.run import config_from_args, parse_args

    from kubetune_operator.finetunejob import builders
    from tests.unit.test_operator_builders import SETTINGS, ftj

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # torchrun sets it
    pod = builders.job(ftj(resources={"nodes": 2, "gpusPerNode": 8}), 1, SETTINGS)["spec"]["template"]["spec"]
    [command] = [c["command"] for c in pod["containers"]]
    assert command[:3] == ["python", "-m", "kubetune_trainer.launch"]
    # The kubelet expands $(NODE_RANK) from the env (the Job's completion index).
    config, _, _ = config_from_args(parse_args([a.replace("$(NODE_RANK)", "1") for a in command[3:]]))
    assert config.rdzv_backend == "static" and (config.min_nodes, config.max_nodes) == (2, 2)
    assert config.rdzv_endpoint == "llama-lora-1-0.llama-lora-workers.team-a.svc:29500"
    handler = create_rdzv_handler(
        RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            **config.rdzv_configs,
        )
    )
    assert handler.rank == 1 and handler.timeout.total_seconds() == 1800
