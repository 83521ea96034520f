"""Run a rendered pod's containers as processes on this host, for a runtime with no image here.

vLLM's image cannot be pulled or built on this machine (no registry, and its CPU build is a
6 GB environment of its own: hack/vllm-env.sh), so the serving tests run the pod the operator
renders for an AdapterDeployment the way a kubelet would, minus the container: init containers
one after another to completion, then every container with its command, args and env
(values and secretKeyRefs), all in one network namespace joined to the host by a veth pair (the
pod's network: containers reach each other on 127.0.0.1, the server's fixed port clashes with
nothing, the host reaches the pod at ``ip``).

What differs from a pod, and why:
- an image is a local environment: ``images`` maps each image name to the directory put first
  on PATH (the trainer image to kubetune's .venv/bin, vLLM's to hack/vllm-env.sh's);
- volumes are host directories, and a volume's mountPath in an arg, an env value or the working
  directory is rewritten to that directory (a pod's root file system is not there to mount into);
- processes run as root: the host's environments are not readable by the pod user.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .node import Network
from .procs import Proc, TestgroundError, stop

Body = dict[str, Any]


@dataclass
class HostPod:
    spec: Body  # a pod spec (e.g. a Deployment's .spec.template.spec)
    workdir: Path
    images: Mapping[str, Path]
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    network: Network = field(default_factory=Network)
    procs: list[Proc] = field(default_factory=list)
    _volumes: dict[str, Path] = field(default_factory=dict)
    _volume_root: Path | None = None

    @property
    def ip(self) -> str:
        return self.network.node_ip

    @property
    def host_ip(self) -> str:
        """The host as the pod sees it (where S3 and the API server listen)."""
        return self.network.host_ip

    def create_network(self) -> HostPod:
        """The pod's network first: its host address goes into the env the pod is rendered with."""
        self.network.create()
        return self

    def start(self, init_timeout: float = 600) -> HostPod:
        try:
            self._make_volumes()
            for c in self.spec.get("initContainers") or []:
                proc = self._run(c, "init-")
                try:
                    code = proc.popen.wait(timeout=init_timeout)
                except subprocess.TimeoutExpired as e:
                    raise TestgroundError(
                        f"init container {c['name']} still running after {init_timeout} s"
                    ) from e
                if code != 0:
                    raise TestgroundError(f"init container {c['name']} exited {code}:\n{proc.log_tail()}")
            for c in self.spec["containers"]:
                self._run(c, "")
        except BaseException:
            self.stop()
            raise
        return self

    def write_config_map(self, name: str, data: Mapping[str, str]) -> None:
        """What the kubelet does when a mounted ConfigMap changes: swap the files atomically."""
        for vol, path in self._volumes.items():
            if (self._volume(vol).get("configMap") or {}).get("name") == name:
                for key, text in data.items():
                    tmp = path / f".{key}.tmp"
                    tmp.write_text(text)
                    tmp.replace(path / key)

    def logs(self, container: str) -> str:
        for p in self.procs:
            if p.name == container:
                return p.log.read_text(errors="replace")
        raise KeyError(container)

    def alive(self, container: str) -> bool:
        return any(p.name == container and p.alive() for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(TestgroundError):
                stop(p, timeout=10)
        self.network.delete()
        if self._volume_root is not None:
            shutil.rmtree(self._volume_root, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------

    def _volume(self, name: str) -> Body:
        for v in self.spec.get("volumes") or []:
            if v["name"] == name:
                return v
        raise TestgroundError(f"volumeMount {name!r} names no volume of the pod")

    def _make_volumes(self) -> None:
        # A short root: unix sockets the containers make in their volumes (vLLM's zmq sockets in
        # TMPDIR) must fit in 107 bytes, which a path under pytest's tmp_path does not.
        self._volume_root = Path(tempfile.mkdtemp(prefix="ktpod-"))
        for v in self.spec.get("volumes") or []:
            path = self._volume_root / v["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in v:
                name = v["configMap"]["name"]
                if name not in self.config_maps:
                    raise TestgroundError(f"the pod mounts ConfigMap {name!r}, which the test did not give")
                for key, text in self.config_maps[name].items():
                    (path / key).write_text(text)
            elif "emptyDir" not in v:
                raise TestgroundError(
                    f"volume {v['name']}: only emptyDir and configMap volumes run on the host"
                )
            self._volumes[v["name"]] = path

    def _env(self, container: Body, rewrite: Any) -> dict[str, str]:
        image = container["image"]
        if image not in self.images:
            raise TestgroundError(f"container {container['name']}: no local environment for image {image!r}")
        env = {"PATH": f"{self.images[image]}:/usr/local/bin:/usr/bin:/bin"}
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = rewrite(str(e["value"]))
            elif ref := (e.get("valueFrom") or {}).get("secretKeyRef"):
                try:
                    env[e["name"]] = self.secrets[ref["name"]][ref["key"]]
                except KeyError as err:
                    if ref.get("optional"):
                        continue
                    raise TestgroundError(
                        f"env {e['name']}: Secret {ref['name']}/{ref['key']} not given"
                    ) from err
            else:
                raise TestgroundError(
                    f"env {e['name']}: only value and secretKeyRef run on the host: {json.dumps(e)}"
                )
        return env

    def _run(self, container: Body, prefix: str) -> Proc:
        mounts = {m["mountPath"]: self._volumes[m["name"]] for m in container.get("volumeMounts") or []}
        # Longest mount path first, and only whole path components (/adapters, not /adapters2).
        pattern = re.compile(
            r"(?<![\w/.-])("
            + "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
            + r")(?=/|$|[^\w.-])"
        )

        def rewrite(text: str) -> str:
            return pattern.sub(lambda m: str(mounts[m.group(1)]), text) if mounts else text

        argv = [rewrite(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        if not argv:
            raise TestgroundError(
                f"container {container['name']} has no command: the image's entrypoint is unknown here"
            )
        cwd = rewrite(container.get("workingDir") or str(self.workdir))
        log = self.workdir / "logs" / f"{prefix}{container['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", self.network.netns, *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd,
                env=self._env(container, rewrite),
            )
        proc = Proc(container["name"], popen, log)
        self.procs.append(proc)
        return proc


def image_env(path: str | os.PathLike[str]) -> Path:
    """The bin directory of a virtualenv, as an image's PATH."""
    return Path(path) / "bin"
