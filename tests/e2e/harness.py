"""Play the kubelet for chosen pods: run the operator-generated container command as a local process.

kwok keeps such pods Running (label kwok.kubetune.io/outcome=hold); this harness gives them a
real process: the container's command and args, its env (values, Secret keys, downward API),
its ConfigMap mounts written to a local directory, and a token for the pod's ServiceAccount
from the TokenRequest API (as a kubeconfig, since /var/run/secrets is not ours to write). Paths
under the container's mounts are mapped to local directories, in argv, env and the mounted
files alike. When the process exits, its exit code and termination message are written back
into the pod's status, as a kubelet would.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client

from tests.testground.cluster import ControlPlane
from tests.testground.procs import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class PodProcess:
    pod: str
    namespace: str
    popen: subprocess.Popen[bytes]
    root: Path
    log: Path
    termination_log: Path
    container: str
    image: str
    ports: dict[int, int]  # container port -> the local port the process was given
    reported: bool = False

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class KubeletHarness:
    cluster: ControlPlane
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, PodProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.api = self.cluster.api_client()
        self.core = client.CoreV1Api(self.api)

    # ---- running a pod ---------------------------------------------------------------------------

    def run_pod(self, namespace: str, name: str) -> PodProcess:
        """Start the pod's container command; its declared ports move to free local ports (`ports`)."""
        pod = self.core.read_namespaced_pod(name, namespace)
        spec = pod.spec
        [container] = spec.containers
        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        mounts = self._materialise_mounts(pod, container, root)
        # Every "pod" here shares the host's network: give each declared port a free one.
        port_map = {p.container_port: free_port() for p in container.ports or []}
        env = self._env(pod, container, mounts)
        env.update({k: str(port_map[int(v)]) for k, v in env.items() if v.isdigit() and int(v) in port_map})
        env["KUBECONFIG"] = str(self._kubeconfig(namespace, spec.service_account_name, root))
        termination_log = root / "termination-log"
        env["KUBETUNE_TERMINATION_MESSAGE_PATH"] = str(termination_log)
        argv = [self._map(a, mounts) for a in [*(container.command or []), *(container.args or [])]]
        for old, new in port_map.items():
            argv = [
                str(new) if a == str(old) else a[: -len(str(old))] + str(new) if a.endswith(f":{old}") else a
                for a in argv
            ]
        if argv and not Path(argv[0]).is_absolute() and (VENV_BIN / argv[0]).exists():
            argv[0] = str(VENV_BIN / argv[0])
        log = root / "output.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
            )
        proc = PodProcess(
            name, namespace, popen, root, log, termination_log, container.name, container.image, port_map
        )
        self.processes[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the "container", as a container runtime does.

        torchrun starts its workers in sessions of their own, so the launcher's process group
        is not enough: walk the process tree.
        """
        _signal_tree(self.processes[name].popen.pid, sig)

    def wait_and_report(self, name: str, timeout: float) -> int:
        """Wait for the process, then write its end into the pod status like a kubelet."""
        proc = self.processes[name]
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_tree(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
            raise AssertionError(
                f"pod {name}'s process ran past {timeout}s; output:\n{proc.output()[-4000:]}"
            ) from None
        if code < 0:  # killed by a signal: what a container runtime reports
            code = 128 - code
        self.report(proc, code)
        return code

    def report(self, proc: PodProcess, code: int) -> None:
        message = proc.termination_log.read_text()[-4096:] if proc.termination_log.exists() else ""
        if not message and code != 0:  # FallbackToLogsOnError
            message = proc.output()[-4096:]
        term: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        if message:
            term["message"] = message
        self.core.patch_namespaced_pod_status(
            proc.pod,
            proc.namespace,
            {
                "status": {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                    "containerStatuses": [
                        {
                            "name": proc.container,
                            "image": proc.image,
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"terminated": term},
                        }
                    ],
                }
            },
        )
        proc.reported = True

    def stop_all(self) -> None:
        for proc in self.processes.values():
            _signal_tree(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()

    # ---- the pod's environment -------------------------------------------------------------------

    def _materialise_mounts(self, pod: Any, container: Any, root: Path) -> dict[str, Path]:
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for m in container.volume_mounts or []:
            local = root / "mounts" / m.mount_path.strip("/").replace("/", "_")
            local.mkdir(parents=True, exist_ok=True)
            mounts[m.mount_path] = local
            vol = volumes.get(m.name)
            if vol is not None and vol.config_map is not None:
                cm = self.core.read_namespaced_config_map(vol.config_map.name, pod.metadata.namespace)
                for key, text in (cm.data or {}).items():
                    (local / key).write_text(text)
        # Paths inside mounted files (e.g. output_dir: /workspace/output) follow the mapping too.
        for local in mounts.values():
            for f in local.iterdir():
                if f.is_file():
                    f.write_text(self._map(f.read_text(), mounts))
        return mounts

    @staticmethod
    def _map(text: str, mounts: dict[str, Path]) -> str:
        # One pass, longest mount first, whole path components only: a mapped path may itself
        # live under a mount path (/tmp) and must not be mapped twice.
        pattern = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        return re.sub(f"(?<![\\w/.-])({pattern})(?=/|$|[^\\w.-])", lambda m: str(mounts[m.group(1)]), text)

    def _env(self, pod: Any, container: Any, mounts: dict[str, Path]) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            # What the kubelet gives every pod; the trainer reads it to know it is in a pod.
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.cluster.ports["apiserver"]),
            "HOSTNAME": pod.metadata.name,
        }
        for e in container.env or []:
            if e.value is not None:
                env[e.name] = self._map(e.value, mounts)
            elif e.value_from is not None and e.value_from.secret_key_ref is not None:
                ref = e.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                env[e.name] = base64.b64decode(secret.data[ref.key]).decode()
            elif e.value_from is not None and e.value_from.field_ref is not None:
                env[e.name] = self._field(pod, e.value_from.field_ref.field_path)
        env.update(self.extra_env)
        return env

    @staticmethod
    def _field(pod: Any, path: str) -> str:
        if path == "metadata.namespace":
            return pod.metadata.namespace
        if path == "metadata.name":
            return pod.metadata.name
        if path.startswith("metadata.annotations['"):
            return (pod.metadata.annotations or {}).get(path[len("metadata.annotations['") : -2], "")
        if path.startswith("metadata.labels['"):
            return (pod.metadata.labels or {}).get(path[len("metadata.labels['") : -2], "")
        raise AssertionError(f"the harness does not know fieldRef {path}")

    def _kubeconfig(self, namespace: str, service_account: str | None, root: Path) -> Path:
        token = self.core.create_namespaced_service_account_token(
            service_account or "default", namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        cfg = yaml.safe_load(self.cluster.kubeconfig.read_text())
        cfg["users"] = [{"name": "pod", "user": {"token": token}}]
        cfg["contexts"][0]["context"]["user"] = "pod"
        path = root / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        return path


def _signal_tree(pid: int, sig: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
