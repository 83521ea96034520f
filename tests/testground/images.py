"""The kubetune images: names, buildah's storage, and pushing them to the loopback registry.

hack/images.sh builds the images with buildah into a storage under
${KUBETUNE_CACHE:-~/.cache/kubetune}/containers (so layers survive between sessions), then runs

    python -m tests.testground.images push localhost/kubetune/operator:0.1.0 localhost/kubetune/trainer:0.1.0

which starts the registry (tests/testground/registry.py) on its persistent storage, pushes each
image as kubetune/<name>:<tag>, stops it and drops what is no longer tagged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cluster import REPO
from .procs import TestgroundError, free_port, stop_pid
from .registry import Registry, default_storage, port_free_on

NAMES = ("operator", "trainer")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def storage_conf() -> Path:
    """containers-storage.conf(5) of buildah's storage for the kubetune images (hack/images.sh writes it)."""
    return cache_dir() / "containers" / "storage.conf"


def app_version() -> str:
    """The chart's appVersion: the images' tag."""
    chart = yaml.safe_load((REPO / "charts" / "kubetune" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def repository(name: str) -> str:
    """The image's repository in the registry: kubetune/<name>."""
    return f"kubetune/{name}"


def local_name(name: str) -> str:
    """The image's name in buildah's storage: localhost/kubetune/<name>:<appVersion>."""
    return f"localhost/{repository(name)}:{app_version()}"


def buildah_env() -> dict[str, str]:
    if not storage_conf().exists():
        raise TestgroundError(f"no image storage at {storage_conf().parent}: run `make images`.")
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage_conf())}


def buildah(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run buildah on the kubetune image storage; fails with its output."""
    exe = shutil.which("buildah")
    if exe is None:
        raise TestgroundError(
            "buildah is not installed: run `make images` (hack/host-packages.sh installs it from Debian)."
        )
    res = subprocess.run(
        [exe, *args], capture_output=True, text=True, env=buildah_env(), timeout=timeout, check=False
    )
    if check and res.returncode != 0:
        raise TestgroundError(
            f"buildah {' '.join(args)} exited {res.returncode}:\n{res.stderr.strip()[-3000:]}"
        )
    return res


def require_local(name: str) -> str:
    """The local image name; fails saying what to run when the image was not built."""
    image = local_name(name)
    if buildah("inspect", "--type", "image", image, check=False).returncode != 0:
        raise TestgroundError(
            f"image {image} is not in buildah's storage ({storage_conf()}): run `make images`."
        )
    return image


def image_id(image: str) -> str:
    """sha256:<id> of a local image: the digest of its config, as a registry's manifest names it."""
    return (
        "sha256:"
        + buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", image).stdout.strip()
    )


def image_config(image: str) -> dict[str, Any]:
    """The OCI config of a local image (User, Env, WorkingDir, Entrypoint, Cmd, ...)."""
    info = json.loads(buildah("inspect", "--type", "image", image).stdout)
    return dict(info["OCIv1"]["config"])


def _runc() -> str:
    exe = shutil.which("runc")
    if exe is None:
        raise TestgroundError(
            "runc is not installed: run hack/host-packages.sh (it installs runc from Debian)."
        )
    return exe


RUNC_ROOT = "/run/kubetune-runc"


@dataclass
class Container:
    """One container from a local image, run by runc the way a kubelet's runtime runs a pod's.

    The root filesystem is read-only (an overlay mount of the image, `buildah mount`), the process
    runs as the image's USER with the image's environment and working directory, with no
    capabilities; `mounts` are bind mounts {container path: host path} (writable), `env`
    adds to or overrides the image's. host_network=True shares the host's network namespace
    (the container reaches 127.0.0.1 services); otherwise it has its own, empty one.
    """

    image: str
    args: list[str] | None = None  # None: the image's ENTRYPOINT + CMD
    env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, Path] = field(default_factory=dict)
    host_network: bool = False
    user: str | None = None  # None: the image's USER
    workdir: Path | None = None
    id: str = field(default_factory=lambda: f"kubetune-test-{uuid.uuid4().hex[:10]}")
    popen: subprocess.Popen[bytes] | None = None
    _ctr: str | None = None

    def _spec(self, rootfs: str) -> dict[str, Any]:
        cfg = image_config(self.image)
        user = self.user or cfg.get("User") or "0:0"
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise TestgroundError(
                f"{self.image}: USER {user!r} is not numeric (a pod's runAsNonRoot needs a UID)"
            )
        env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
        env.update(self.env)
        args = (
            self.args if self.args is not None else [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
        )
        if not args:
            raise TestgroundError(f"{self.image}: no command (no args, ENTRYPOINT or CMD)")
        namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
        if not self.host_network:
            namespaces.append({"type": "network"})
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=268435456"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ]
        if self.host_network:
            mounts.append(
                {
                    "destination": "/etc/resolv.conf",
                    "type": "bind",
                    "source": "/etc/resolv.conf",
                    "options": ["rbind", "ro"],
                }
            )
        for dest, src in self.mounts.items():
            mounts.append(
                {"destination": dest, "type": "bind", "source": str(src), "options": ["rbind", "rw"]}
            )
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": int(uid), "gid": int(gid or uid)},
                "args": args,
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": cfg.get("WorkingDir") or "/",
                "capabilities": {
                    "bounding": [],
                    "effective": [],
                    "permitted": [],
                    "inheritable": [],
                    "ambient": [],
                },
                "noNewPrivileges": True,
            },
            "root": {"path": rootfs, "readonly": True},
            "hostname": "kubetune-test",
            "mounts": mounts,
            "linux": {
                "namespaces": namespaces,
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        }

    def start(self, log: Path | None = None) -> Container:
        """Start it in the background (stdout and stderr to `log`, or captured by wait())."""
        require = self.image if self.image.startswith("localhost/") else None
        if require and buildah("inspect", "--type", "image", require, check=False).returncode != 0:
            raise TestgroundError(
                f"image {require} is not in buildah's storage ({storage_conf()}): run `make images`."
            )
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="kubetune-ctr-"))
        self._ctr = buildah("from", "--pull-never", "--name", self.id, self.image).stdout.strip()
        try:
            rootfs = buildah("mount", self._ctr).stdout.strip()
            bundle = self.workdir / "bundle"
            bundle.mkdir(parents=True, exist_ok=True)
            (bundle / "config.json").write_text(json.dumps(self._spec(rootfs), indent=1))
            out: Any = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115 - the child owns it
            self.popen = subprocess.Popen(
                [_runc(), "--root", RUNC_ROOT, "run", "--bundle", str(bundle), self.id],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log else subprocess.PIPE,
                start_new_session=True,
            )
            if log:
                out.close()
        except BaseException:
            self.remove()
            raise
        return self

    def wait(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """Wait for it to exit (killing it after `timeout`); its exit code and output."""
        assert self.popen is not None, "start() first"
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.remove()
            out, err = self.popen.communicate()
            raise TestgroundError(
                f"container {self.id} ({self.image}) did not exit within {timeout:.0f}s; output:\n"
                f"{(out or b'').decode(errors='replace')[-3000:]}{(err or b'').decode(errors='replace')[-3000:]}"
            ) from None
        return subprocess.CompletedProcess(
            self.popen.args,
            self.popen.returncode,
            (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"),
        )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (what a kubelet sends), then SIGKILL."""
        if self.alive():
            subprocess.run(
                [_runc(), "--root", RUNC_ROOT, "kill", self.id, "TERM"], capture_output=True, check=False
            )
            assert self.popen is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.remove()

    def remove(self) -> None:
        """Kill what is left, delete the runc container, unmount and remove the working container."""
        subprocess.run(
            [_runc(), "--root", RUNC_ROOT, "delete", "--force", self.id], capture_output=True, check=False
        )
        if self.popen is not None and self.popen.poll() is None:
            stop_pid(self.popen.pid, timeout=5)
        if self._ctr is not None:
            buildah("umount", self._ctr, check=False)
            buildah("rm", self._ctr, check=False)
            self._ctr = None


def run_container(
    image: str, args: list[str] | None = None, *, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command in a fresh container of `image` (see Container) and return its result."""
    ctr = Container(image, args, **kw).start()
    try:
        return ctr.wait(timeout)
    finally:
        ctr.remove()


def push_port(storage: Path) -> int:
    """The same port for every push to one storage when it is free (else any free port).

    buildah remembers which layer blobs it already sent, per registry address: at a stable
    address an image whose dependency layer did not change sends only its new layers.
    """
    port = 20000 + zlib.crc32(str(storage).encode()) % 10000
    return port if port_free_on("127.0.0.1", port) else free_port()


def push(images: list[str], *, host: str = "127.0.0.1") -> list[str]:
    """Push local images (localhost/kubetune/<name>:<tag>) to the persistent registry; lines of what happened.

    An image the registry already holds (same config digest, i.e. same image ID) is not pushed.
    Layers are gzipped (buildah's default; buildah 1.28's --disable-compression still gzips).
    """
    lines = []
    with tempfile.TemporaryDirectory(prefix="kubetune-registry-") as tmp:
        storage = default_storage()
        reg = Registry(Path(tmp), storage=storage, host=host, port=push_port(storage))
        t0 = time.monotonic()
        reg.start()
        lines.append(f"registry up at {reg.url} in {time.monotonic() - t0:.1f}s (storage {reg.storage})")
        pushed = False
        try:
            for image in images:
                if not image.startswith("localhost/"):
                    raise TestgroundError(f"{image}: expected a local name localhost/<repository>:<tag>")
                dest = image.removeprefix("localhost/")
                repo, tag = dest.rsplit(":", 1)
                if reg.config_digest(repo, tag) == image_id(image):
                    lines.append(f"{reg.ref(repo, tag)} is up to date (image {image_id(image)[7:19]})")
                    continue
                t1 = time.monotonic()
                buildah(
                    "push",
                    "--tls-verify=false",
                    "--quiet",
                    image,
                    f"docker://{reg.address}/{dest}",
                    timeout=3600,
                )
                pushed = True
                lines.append(f"pushed {image} -> {reg.ref(repo, tag)} in {time.monotonic() - t1:.1f}s")
        finally:
            reg.stop()
        if pushed:
            t2 = time.monotonic()
            reg.garbage_collect()
            lines.append(
                f"registry: untagged manifests and unreferenced blobs dropped in {time.monotonic() - t2:.1f}s"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.testground.images", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="push local images to the persistent loopback registry")
    p.add_argument("images", nargs="+", help="local names, localhost/kubetune/<name>:<tag>")
    args = ap.parse_args(argv)
    try:
        for line in push(args.images):
            print(f">> {line}", flush=True)
    except TestgroundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
