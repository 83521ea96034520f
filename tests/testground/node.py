"""A real Kubernetes node beside the kwok ones: containerd 2, runc, CNI (bridge, host-local,
loopback, portmap), kubelet, kube-proxy and CoreDNS, running real containers.

The node lives in its own network namespace (joined to the host by a veth pair) and its own
mount namespace, the way kind puts a node in a container, but without a container engine:

    host (control plane, S3, registry)  <-- veth 10.213.N.1/30 -- 10.213.N.2 -->  node netns
                                                                                    containerd, kubelet,
                                                                                    kube-proxy, CoreDNS,
                                                                                    bridge kt0 -> pods

So kube-proxy's iptables rules, the CNI bridge and every pod network live in the node's
network namespace, and containerd's overlay mounts, pod volumes and sandbox mounts in its
mount namespace: tearing the node down (stop the processes, delete both namespaces, remove
its cgroups) leaves nothing behind on the host. Pods reach the API server, S3 and the
registry at the host end of the veth (``host_ip``); the API server reaches the kubelet at
``node_ip``.

Images come from the loopback registry as ``localhost:<port>/kubetune/...`` (what a
user's cluster would call them); containerd maps that name to ``http://<host_ip>:<port>``
through a hosts.toml mirror, the way kind documents local registries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .procs import Proc, TestgroundError, pid_alive, start, stop_pid, wait_for

NODE_NAME = "real-node-0"
# Pods that must run for real carry this toleration and node selector; everything else keeps
# landing on the kwok nodes, whose fake kubelets the rest of the suite relies on.
REAL_NODE_LABEL = "kubetune.io/real-node"
REAL_NODE_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
POD_SUBNET = "10.88.0.0/16"  # inside the node's network namespace only
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "kubetune/pause:3.10"
# cgroup v1 hierarchies the kubelet needs its cgroup root in (cgroupfs driver).
CGROUP_V1 = Path("/sys/fs/cgroup")

HOST_TOOLS = {"runc": "runc", "ip": "iproute2", "iptables": "iptables", "nsenter": "util-linux"}


def scheduling() -> dict[str, Any]:
    """What a FineTuneJob's spec.resources / a pod spec needs to run on the real node."""
    return {
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [dict(REAL_NODE_TAINT, operator="Equal")],
    }


def host_can_run_containers() -> None:
    """Fail with what is missing when this host cannot run the node (never skip)."""
    if os.geteuid() != 0:
        raise TestgroundError(
            "the real test node needs root (it runs a kubelet, containerd and network namespaces, as any "
            "node does). Run the tests as root, e.g. in a VM or a privileged CI runner."
        )
    missing = [pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None]
    if missing:
        raise TestgroundError(
            f"host packages missing for the real node: {', '.join(sorted(set(missing)))}. "
            "Run hack/host-packages.sh (or `apt-get install -y " + " ".join(sorted(set(missing))) + "`)."
        )
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise TestgroundError(
            "the kernel has no overlay filesystem (not in /proc/filesystems): containerd's overlayfs "
            "snapshotter needs it. Use a kernel with CONFIG_OVERLAY_FS, or a VM instead of this container."
        )
    if not (CGROUP_V1 / "memory").is_dir() and not (CGROUP_V1 / "cgroup.controllers").exists():
        raise TestgroundError(f"no cgroup hierarchy mounted at {CGROUP_V1}: containers need cgroups.")


def run(argv: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise TestgroundError(
            f"`{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip() or res.stdout}"
        )
    return res


def _used_ipv4() -> str:
    return run(["ip", "-4", "-o", "addr"]).stdout


def pick_link_subnet() -> int:
    """N such that 10.213.N.0/30 is on no interface (two nodes, e.g. dev cluster + tests, may coexist)."""
    used = _used_ipv4()
    for n in range(1, 255):
        if f" 10.213.{n}." not in used:
            return n
    raise TestgroundError("no free 10.213.N.0/30 link subnet for the real node's veth pair")


@dataclass
class Network:
    """The node's network namespace and the veth pair that joins it to the host."""

    ident: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = field(default_factory=pick_link_subnet)

    @property
    def netns(self) -> str:
        return f"kt-{self.ident}"

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.subnet}.1"

    @property
    def node_ip(self) -> str:
        return f"10.213.{self.subnet}.2"

    @property
    def host_link(self) -> str:
        return f"kth-{self.ident}"

    def create(self) -> Network:
        ns, host, peer = self.netns, self.host_link, f"ktn-{self.ident}"
        try:
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns])
            run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", host])
            run(["ip", "link", "set", host, "up"])
            inside = ["ip", "netns", "exec", ns]
            run([*inside, "ip", "link", "set", "lo", "up"])
            run([*inside, "ip", "link", "set", peer, "name", "eth0"])
            run([*inside, "ip", "addr", "add", f"{self.node_ip}/30", "dev", "eth0"])
            run([*inside, "ip", "link", "set", "eth0", "up"])
            run([*inside, "ip", "route", "add", "default", "via", self.host_ip])
            # Per network namespace: the host's own settings are left alone.
            run([*inside, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            run([*inside, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        # Deleting the namespace deletes the veth pair and every iptables rule and bridge in it.
        run(["ip", "netns", "delete", self.netns], check=False)
        run(["ip", "link", "delete", self.host_link], check=False)


class MountNamespace:
    """A persistent, private mount namespace (a bind-mounted nsfs file), with tmpfs on /run and
    /var/log inside so containerd's and the kubelet's fixed paths there stay in the node."""

    def __init__(self, workdir: Path, binds: dict[str, Path] | None = None) -> None:
        self.dir = workdir / "mntns"
        self.file = self.dir / "mnt"
        # Host directories shown at short paths inside (unix sockets live under them: 108 bytes at most).
        self.binds = binds or {}

    def create(self) -> MountNamespace:
        self.dir.mkdir(parents=True, exist_ok=True)
        # An nsfs file can only be bind-mounted on a private mount: make the holder one.
        run(["mount", "--bind", str(self.dir), str(self.dir)])
        run(["mount", "--make-private", str(self.dir)])
        self.file.touch()
        run(["unshare", f"--mount={self.file}", "--propagation", "private", "true"])
        # Shared inside the node (the kubelet wants mount propagation), private to the host.
        script = (
            "mount --make-rshared / && mount -t tmpfs -o mode=755 tmpfs /run && "
            "mount -t tmpfs -o mode=755 tmpfs /var/log && mkdir -p /run/containerd /var/log/pods /var/log/containers"
        )
        for inside, host in self.binds.items():
            host.mkdir(parents=True, exist_ok=True)
            script += f" && mkdir -p {inside} && mount --bind {host} {inside}"
        run(self.enter(["sh", "-c", script]))
        return self

    def enter(self, argv: list[str], netns: str | None = None) -> list[str]:
        prefix = [shutil.which("nsenter") or "/usr/bin/nsenter", f"--mount={self.file}"]
        if netns:
            prefix.append(f"--net=/run/netns/{netns}")
        return [*prefix, "--", *argv]

    def inode(self) -> int | None:
        try:
            return os.stat(self.file).st_ino
        except OSError:
            return None

    def delete(self) -> None:
        if self.file.exists():
            run(["umount", str(self.file)], check=False)
        if self.dir.exists():
            run(["umount", str(self.dir)], check=False)


def _processes_in_mount_ns(inode: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(entry / "ns" / "mnt").st_ino == inode:
                pids.append(int(entry.name))
    return pids


class Cgroups:
    """The kubelet's cgroup root (``/kubetune-<id>``) in every cgroup v1 hierarchy, removed at teardown."""

    def __init__(self, name: str) -> None:
        self.name = name

    def hierarchies(self) -> list[Path]:
        out = []
        for h in sorted(CGROUP_V1.iterdir()):
            if h.is_dir() and not h.is_symlink() and (h / "cgroup.procs").exists():
                out.append(h)
        return out

    def create(self) -> None:
        for h in self.hierarchies():
            d = h / self.name
            d.mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():  # cpuset children start empty: inherit the parent's
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((h / f).read_text())

    def leftover_pids(self) -> list[int]:
        pids: set[int] = set()
        for h in self.hierarchies():
            for procs in (h / self.name).rglob("cgroup.procs") if (h / self.name).exists() else []:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return sorted(pids)

    def delete(self) -> None:
        for h in self.hierarchies():
            root = h / self.name
            if not root.exists():
                continue
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


@dataclass
class RealNode:
    """One real node registered with a ``ControlPlane`` whose API server advertises ``network.host_ip``."""

    workdir: Path
    bin_dir: Path
    network: Network
    kubeconfig: Path  # admin kubeconfig whose server is reachable from the node (host_ip)
    ca_crt: Path
    registry_port: int | None = None
    name: str = NODE_NAME
    procs: dict[str, Proc] = field(default_factory=dict)
    detached_pids: dict[str, int] = field(default_factory=dict)
    # Tainted (the test session: only pods that ask land here) or not (the dev cluster, where
    # the kwok nodes are tainted instead and every pod runs for real).
    tainted: bool = True

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        # The kubelet's root dir, where pod volumes live, is on disk in workdir but appears at a
        # short path in the node (it creates unix sockets below it).
        self.kubelet_root = "/run/kubetune/kubelet"
        self.mnt = MountNamespace(self.workdir, binds={self.kubelet_root: self.workdir / "kubelet"})
        self.cgroups = Cgroups(f"kubetune-{self.network.ident}")
        self.containerd_sock = "/run/containerd/containerd.sock"  # in the node's own /run

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, kubectl) -> RealNode:
        host_can_run_containers()
        self._check_binaries()
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.mnt.create()
            self.cgroups.create()
            self._start_containerd()
            self._start_kubelet()
            self._start_kube_proxy()
            self._start_coredns()
            self._wait_ready(kubectl)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop everything and leave nothing: pods, containers, mounts, namespaces, cgroups."""
        # Processes this object started, or (`make dev-cluster-down`) the pids a state file recorded.
        pids = {name: p.pid for name, p in self.procs.items()} | self.detached_pids
        if "kubelet" in pids:
            stop_pid(pids.pop("kubelet"))
        if "containerd" in pids and pid_alive(pids["containerd"]):
            # Stop and remove every pod sandbox through the CRI, so CNI DEL runs for each.
            self._crictl("rmp", "--all", "--force", check=False, timeout=120)
            self._prune_images()
        for name in reversed(list(pids)):
            stop_pid(pids[name])
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1)
        self.procs.clear()
        self.detached_pids = {}
        inode = self.mnt.inode()
        if inode is not None:
            # Shims and container processes outlive containerd by design: sweep the namespace.
            for _ in range(3):
                pids = _processes_in_mount_ns(inode)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                time.sleep(0.3)
        for pid in self.cgroups.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.mnt.delete()
        self.cgroups.delete()

    def _prune_images(self) -> None:
        """Keep in the shared image store only what this node pulled from its registry by name.

        Rebuilt images leave their old versions behind (the tag moved on), and so do names from
        other sessions' registry ports: without this the store grows by GBs per trainer rebuild.
        """
        if self.registry_port is None:
            return
        res = self._crictl("images", "--output=json", check=False)
        if res.returncode != 0:
            return
        current = f"localhost:{self.registry_port}/"
        for image in json.loads(res.stdout).get("images", []):
            tags = image.get("repoTags") or []
            if not any(t.startswith(current) for t in tags):
                self._crictl("rmi", image["id"], check=False, timeout=120)

    def state(self) -> dict[str, Any]:
        """What `from_state` needs to tear the node down from another process (dev cluster)."""
        return {
            "workdir": str(self.workdir),
            "bin_dir": str(self.bin_dir),
            "network": {"ident": self.network.ident, "subnet": self.network.subnet},
            "kubeconfig": str(self.kubeconfig),
            "ca_crt": str(self.ca_crt),
            "registry_port": self.registry_port,
            "pids": {name: p.pid for name, p in self.procs.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RealNode:
        return cls(
            Path(state["workdir"]),
            Path(state["bin_dir"]),
            Network(**state["network"]),
            kubeconfig=Path(state["kubeconfig"]),
            ca_crt=Path(state["ca_crt"]),
            registry_port=state.get("registry_port"),
            detached_pids=dict(state["pids"]),
        )

    def leftovers(self) -> list[str]:
        """What a torn-down node left on the host (empty when the teardown is complete)."""
        found = []
        if self.network.netns in run(["ip", "netns", "list"]).stdout:
            found.append(f"network namespace {self.network.netns}")
        if self.network.host_link in run(["ip", "-o", "link"]).stdout:
            found.append(f"link {self.network.host_link}")
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.workdir) in mounts:
            found.append(f"mounts under {self.workdir}")
        for h in self.cgroups.hierarchies():
            if (h / self.cgroups.name).exists():
                found.append(f"cgroup {h / self.cgroups.name}")
        inode = self.mnt.inode()
        if inode is not None and _processes_in_mount_ns(inode):
            found.append("processes in the node's mount namespace")
        return found

    # ---- helpers tests use -----------------------------------------------------------------------

    def crictl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self._crictl(*args, timeout=timeout)

    def in_node(self, argv: list[str]) -> list[str]:
        """argv run inside the node's mount and network namespaces."""
        return self.mnt.enter(argv, netns=self.network.netns)

    # ---- internals -------------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _check_binaries(self) -> None:
        need = ["containerd", "containerd-shim-runc-v2", "kubelet", "kube-proxy", "crictl", "coredns"]
        need += [f"cni/{p}" for p in ("bridge", "host-local", "loopback", "portmap")]
        missing = [n for n in need if not (self.bin_dir / n).exists()]
        if missing:
            raise TestgroundError(
                f"real-node binaries missing in {self.bin_dir}: {', '.join(missing)}. Build them once with "
                "`make binaries` (Go >= 1.26 and the Go module proxy; cached outside the repo)."
            )

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        path_env = {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        proc = start(name, self.in_node(argv), self.logs, env={**path_env, **(env or {})})
        self.procs[name] = proc
        return proc

    def _crictl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = self.in_node([self._bin("crictl"), f"--runtime-endpoint=unix://{self.containerd_sock}", *args])
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise TestgroundError(f"crictl {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def _node_kubeconfig(self) -> str:
        return str(self.kubeconfig)

    def _containerd_root(self) -> Path:
        """containerd's image store, kept between sessions (the trainer image is ~5 GB to unpack).

        A second node running at the same time (a dev cluster beside a test session) cannot share
        it (containerd locks its metadata database), so that one gets a fresh store of its own.
        """
        cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
        shared = cache / "containerd" / self.bin_dir.name
        db = shared / "io.containerd.metadata.v1.bolt" / "meta.db"
        shared.mkdir(parents=True, exist_ok=True)
        if not db.exists():
            return shared
        with open(db, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return self.workdir / "containerd" / "root"
            fcntl.flock(f, fcntl.LOCK_UN)
        return shared

    def _start_containerd(self) -> None:
        base = self.workdir / "containerd"
        root, state = self._containerd_root(), base / "state"
        cni_conf = self.workdir / "cni" / "net.d"
        certs = self.workdir / "certs.d"
        for d in (root, state, cni_conf, certs):
            d.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-kubetune.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubetune",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "kt0",
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.workdir / "cni" / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )
        pause = "registry.k8s.io/pause:3.10"
        if self.registry_port is not None:
            reg = f"localhost:{self.registry_port}"
            pause = f"{reg}/{PAUSE_IMAGE}"
            # The name pods use (localhost:<port>) is served by the host end of the veth.
            (certs / reg).mkdir(exist_ok=True)
            (certs / reg / "hosts.toml").write_text(
                f'server = "http://{self.network.host_ip}:{self.registry_port}"\n\n'
                f'[host."http://{self.network.host_ip}:{self.registry_port}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
            )
        config = base / "config.toml"
        config.write_text(
            f"""version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{self.containerd_sock}"

[ttrpc]
  address = "{self.containerd_sock}.ttrpc"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  image_pull_progress_timeout = "10m0s"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"

[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE (a VM sandbox), so runc cannot lower oom_score_adj to the
  # kubelet's -998 for sandboxes: cap it at containerd's own, as containerd does in containers.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc")}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{self.bin_dir / "cni"}"]
    conf_dir = "{cni_conf}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
"""
        )
        proc = self._start("containerd", [self._bin("containerd"), f"--config={config}", "--log-level=warn"])

        def up() -> bool:
            return self._crictl("info", check=False, timeout=10).returncode == 0

        wait_for(up, what="containerd's CRI to answer", timeout=60, watch=[proc], interval=0.3)

    def _start_kubelet(self) -> None:
        config = self.workdir / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    # This host has cgroup v1; kubelet >= 1.35 refuses it unless told (KEP-5573).
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{self.cgroups.name}",
                    "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
                    "address": self.network.node_ip,
                    "port": 10250,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": 10248,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(self.ca_crt)},
                    },
                    "authorization": {"mode": "Webhook"},
                    "clusterDomain": CLUSTER_DOMAIN,
                    "clusterDNS": [self.network.node_ip],
                    "resolvConf": "",  # pods see cluster DNS only, not the host's search domains
                    "failSwapOn": False,
                    "serializeImagePulls": False,
                    "registerWithTaints": [REAL_NODE_TAINT] if self.tainted else [],
                    # The development disk is shared with everything else: do not evict or GC
                    # the multi-GB trainer image because the host disk is busy.
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "nodeStatusUpdateFrequency": "4s",
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "10s",
                    "runtimeRequestTimeout": "10m",
                    "shutdownGracePeriod": "0s",
                }
            )
        )
        self._start(
            "kubelet",
            [
                self._bin("kubelet"),
                f"--config={config}",
                f"--kubeconfig={self._node_kubeconfig()}",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.network.node_ip}",
                f"--node-labels={REAL_NODE_LABEL}=true,type=real",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": self._node_kubeconfig()},
                    "mode": "iptables",
                    "clusterCIDR": POD_SUBNET,
                    "hostnameOverride": self.name,
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    # Leave the kernel-wide conntrack table size alone.
                    "conntrack": {"maxPerCore": 0, "min": 0},
                }
            )
        )
        self._start("kube-proxy", [self._bin("kube-proxy"), f"--config={config}", "--v=1"])

    def _start_coredns(self) -> None:
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self._node_kubeconfig()}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        self._start("coredns", [self._bin("coredns"), "-conf", str(corefile)])

    def _wait_ready(self, kubectl) -> None:
        watch = list(self.procs.values())

        def ready() -> bool:
            res = kubectl("get", "node", self.name, "-o", "json", check=False)
            if res.returncode != 0:
                return False
            conds = json.loads(res.stdout).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        wait_for(ready, what=f"the kubelet to register {self.name} and report Ready", timeout=90, watch=watch)

        def dns_ready() -> bool:
            return self._get_in_node("http://127.0.0.1:8181/ready")

        wait_for(dns_ready, what="CoreDNS /ready", timeout=60, watch=watch, interval=0.3)

    def _get_in_node(self, url: str) -> bool:
        code = (
            "import sys, urllib.request; "
            f"sys.exit(0 if urllib.request.urlopen({url!r}, timeout=2).status == 200 else 1)"
        )
        res = subprocess.run(self.in_node(["python3", "-c", code]), capture_output=True, timeout=10)
        return res.returncode == 0
