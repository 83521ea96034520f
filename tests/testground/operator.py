"""Run the real operator (`python -m kubetune_operator`) as a process against the test cluster."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Proc, free_port, start, stop, wait_for


@dataclass
class OperatorProcess:
    kubeconfig: Path
    log_dir: Path
    namespaces: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    resync_seconds: float = 30.0
    name: str = "kubetune-operator"
    proc: Proc | None = None
    metrics_port: int = 0
    health_port: int = 0

    def start(self) -> OperatorProcess:
        self.metrics_port, self.health_port = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--resync-seconds",
            str(self.resync_seconds),
        ]
        for ns in self.namespaces:
            argv += ["--namespace", ns]
        # As in the operator image and the chart (operator/Dockerfile, the Deployment's env).
        env = {"KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test", "MALLOC_ARENA_MAX": "2", **self.env}
        env.pop("KUBECONFIG", None)
        self.proc = start(self.name, argv, self.log_dir, env={**os.environ, **env})

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200

        wait_for(
            healthy, what="the operator's liveness endpoint", timeout=60, watch=[self.proc], interval=0.2
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=10)
            self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_text(self) -> str:
        return self.proc.log.read_text(errors="replace") if self.proc else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()
