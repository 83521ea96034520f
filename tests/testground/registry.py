"""A real container registry for the test ground: distribution's `registry serve` on a free port.

`make images` pushes the operator and trainer images into it; the cluster's node pulls them from
it as `localhost:<port>/kubetune/<name>:<appVersion>`. Its storage lives outside the repository
(`${KUBETUNE_CACHE:-~/.cache/kubetune}/registry`), so pushed images survive between sessions; the
process runs only while needed.

    reg = Registry(workdir).start()          # bind 127.0.0.1 (host="0.0.0.0" for other interfaces)
    reg.require("kubetune/trainer", "0.1.0")  # fails with "run `make images`" when it is missing
    image = reg.ref("kubetune/trainer", "0.1.0")   # localhost:<port>/kubetune/trainer:0.1.0
    reg.stop()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import binaries_dir
from .procs import Proc, TestgroundError, free_port, start, stop, wait_for

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
)


def default_storage() -> Path:
    """Where pushed images are kept between sessions (beside the test binaries)."""
    cache = os.environ.get("KUBETUNE_CACHE") or str(Path.home() / ".cache" / "kubetune")
    return Path(cache) / "registry"


def registry_binary() -> Path:
    return binaries_dir() / "registry"


def port_free_on(host: str, port: int) -> bool:
    """Whether the registry can listen on host:port (it binds as Go does, with SO_REUSEADDR:
    connections of an earlier run in TIME_WAIT do not block the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Registry:
    """distribution's registry (v3) over plain HTTP, serving `storage` on `host`:`port`.

    workdir holds its config.yml and logs/registry.log. port 0 picks a free one.
    """

    workdir: Path
    storage: Path = field(default_factory=default_storage)
    host: str = "127.0.0.1"
    port: int = 0
    proc: Proc | None = None

    # ---- where it is -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """host:port a client on this machine dials (127.0.0.1 when bound to every interface)."""
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{dial}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def ref(self, repository: str, tag: str) -> str:
        """The image reference a node pulls: localhost:<port>/<repository>:<tag>.

        containerd (like Docker) talks plain HTTP to registries on localhost.
        """
        return f"localhost:{self.port}/{repository}:{tag}"

    # ---- life cycle ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.host}:{self.port}"},
        }

    def write_config(self) -> Path:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.yml"
        path.write_text(json.dumps(self.config(), indent=2))  # YAML is a superset of JSON
        return path

    def env(self) -> dict[str, str]:
        # No tracing exporter: distribution v3 would otherwise try an OTLP collector on localhost.
        return {"OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"}

    def start(self, timeout: float = 30) -> Registry:
        self.storage = Path(self.storage).resolve()
        self.storage.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        if not port_free_on(self.host or "0.0.0.0", self.port):
            raise TestgroundError(
                f"port {self.port} on {self.host}, needed by the registry, is taken: "
                f"find the process with `ss -ltnp 'sport = :{self.port}'`, or pass port=0."
            )
        config = self.write_config()
        self.proc = start(
            "registry", [str(registry_binary()), "serve", str(config)], self.workdir / "logs", env=self.env()
        )
        try:
            wait_for(
                self._answers,
                what=f"the registry at {self.url}/v2/ to answer",
                timeout=timeout,
                watch=[self.proc],
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=5)
            self.proc = None

    def __enter__(self) -> Registry:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log_text(self) -> str:
        return self.proc.log.read_text(errors="replace") if self.proc else ""

    def garbage_collect(self) -> str:
        """Delete untagged manifests and the blobs nothing references (stopped registry only)."""
        if self.alive():
            raise TestgroundError("garbage_collect needs the registry stopped (it rewrites its storage)")
        config = self.write_config()
        res = subprocess.run(
            [str(registry_binary()), "garbage-collect", "--delete-untagged", "--quiet", str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
            timeout=600,
        )
        if res.returncode != 0:
            raise TestgroundError(
                f"registry garbage-collect failed ({res.returncode}):\n{res.stderr[-2000:]}"
            )
        return res.stdout

    # ---- what it holds ---------------------------------------------------------------------
    def _answers(self) -> bool:
        status, _ = self._get("/v2/")
        return status == 200

    def _get(self, path: str, accept: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            return e.code, None

    def repositories(self) -> list[str]:
        """Every repository in the registry (the catalog), sorted."""
        repos: list[str] = []
        last = ""
        while True:  # the catalog is paginated
            query = f"/v2/_catalog?n=1000{f'&last={last}' if last else ''}"
            status, body = self._get(query)
            if status != 200:
                raise TestgroundError(f"GET {self.url}{query} answered {status}")
            page = (body or {}).get("repositories") or []
            repos += page
            if len(page) < 1000:
                return sorted(repos)
            last = page[-1]

    def tags(self, repository: str) -> list[str]:
        """The tags of `repository` ([] when the repository does not exist)."""
        status, body = self._get(f"/v2/{repository}/tags/list")
        if status == 404:
            return []
        if status != 200:
            raise TestgroundError(f"GET {self.url}/v2/{repository}/tags/list answered {status}")
        return sorted((body or {}).get("tags") or [])

    def manifest(self, repository: str, tag: str) -> dict[str, Any] | None:
        """The image manifest of repository:tag (Docker v2 schema 2 or OCI), None when absent."""
        status, body = self._get(f"/v2/{repository}/manifests/{tag}", accept=MANIFEST_TYPES)
        if status == 404:
            return None
        if status != 200:
            raise TestgroundError(f"GET {self.url}/v2/{repository}/manifests/{tag} answered {status}")
        return body

    def config_digest(self, repository: str, tag: str) -> str | None:
        """The digest of repository:tag's config blob (equal to the image ID buildah shows)."""
        manifest = self.manifest(repository, tag)
        return manifest["config"]["digest"] if manifest else None

    def has(self, repository: str, tag: str) -> bool:
        return tag in self.tags(repository)

    def require(self, repository: str, tag: str) -> str:
        """The pull reference of repository:tag; fails saying what to run when it is not there."""
        if not self.has(repository, tag):
            held = ", ".join(f"{r}:{t}" for r in self.repositories() for t in self.tags(r)) or "nothing"
            raise TestgroundError(
                f"image {repository}:{tag} is not in the registry (storage {self.storage}; it holds "
                f"{held}): run `make images`."
            )
        return self.ref(repository, tag)
