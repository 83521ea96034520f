"""Starting, watching and stopping the test ground's processes, with errors that say what to do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class TestgroundError(RuntimeError):
    """The test ground could not start or stop; the message says why and what to do."""

    __test__ = False  # not a pytest test class, despite the name


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair(offset: int) -> int:
    """A port p such that p and p + offset are both free (SeaweedFS uses port+10000 for gRPC)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + offset < 65535 and port_is_free(port + offset):
            return port
    raise TestgroundError(f"could not find two free TCP ports {offset} apart on 127.0.0.1")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free(port: int, what: str) -> None:
    if not port_is_free(port):
        raise TestgroundError(
            f"port {port} on 127.0.0.1, needed by {what}, is already taken by another process. "
            f"Find it with `ss -ltnp 'sport = :{port}'` and stop it (an earlier `make dev-cluster`? "
            "run `make dev-cluster-down`), or let the test ground pick another port."
        )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def start(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start a process in its own session (so it outlives `make dev-cluster` and can be stopped as a group)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    if not Path(argv[0]).exists():
        raise TestgroundError(f"{name}: binary {argv[0]} does not exist; run `make binaries` to build it.")
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it from here
    try:
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    finally:
        fh.close()
    return Proc(name, popen, log)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it (weed ignores SIGTERM at times)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
    if pid_alive(pid):
        raise TestgroundError(
            f"process {pid} survived SIGKILL (is it stuck in the kernel? check `ps -o stat= {pid}`)"
        )


def pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our child, so a zombie does not count as alive.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def stop(proc: Proc, timeout: float = 5.0) -> None:
    stop_pid(proc.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=1)


def wait_for(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    watch: Sequence[Proc] = (),
    interval: float = 0.1,
) -> None:
    """Poll `check` until it is true; fail fast (with the log) when a watched process dies; never hang."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for p in watch:
            if not p.alive():
                raise TestgroundError(
                    f"{p.name} exited with code {p.popen.returncode} while waiting for {what}. "
                    f"Last lines of {p.log}:\n{p.log_tail()}"
                )
        try:
            if check():
                return
            last_error = None
        except Exception as e:  # the component is not up yet: keep polling
            last_error = e
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name} ({p.log}):\n{p.log_tail(15)}" for p in watch)
    detail = f" (last error: {last_error})" if last_error else ""
    raise TestgroundError(f"timed out after {timeout:.0f}s waiting for {what}{detail}\n{logs}")
