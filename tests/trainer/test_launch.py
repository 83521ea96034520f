"""The pod launcher keeps the trainer's exit code, which plain torchrun turns into 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubetune_trainer.exit_codes import ExitCode
from kubetune_trainer.launch import exit_code


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
