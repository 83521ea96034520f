"""`make dev-cluster` / `make dev-cluster-down`: the test ground as a long-lived local cluster.

python -m tests.testground up     # control plane, SeaweedFS, the registry and the real node, in the background
python -m tests.testground down   # stop every process `up` started and tear the node down
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from .cluster import FAKE_NODE_TAINT, REPO, ControlPlane, stop_from_state
from .images import app_version
from .node import PAUSE_IMAGE, Network, RealNode
from .procs import TestgroundError
from .registry import Registry
from .s3 import SeaweedS3

DEV = REPO / ".dev"
STATE = DEV / "state.json"


def up() -> int:
    if STATE.exists():
        print(
            f"a dev cluster seems to be running already ({STATE}); run `make dev-cluster-down` first.",
            file=sys.stderr,
        )
        return 1
    if DEV.exists():
        shutil.rmtree(DEV)
    DEV.mkdir()
    t0 = time.monotonic()
    cp = ControlPlane(DEV / "cluster", real_node_default=True).start()
    s3 = registry = None
    try:
        s3 = SeaweedS3(DEV / "s3").start()
        assert cp.network is not None
        registry = Registry(DEV / "registry", host=cp.network.host_ip).start()
        for name in ("operator", "trainer"):
            registry.require(f"kubetune/{name}", app_version())
        registry.require(*PAUSE_IMAGE.split(":"))
        node = cp.start_node(registry_port=registry.port)
    except BaseException:
        for part in (registry, s3, cp):
            if part is not None:
                part.stop()
        raise
    kubeconfig = DEV / "kubeconfig"
    shutil.copy(cp.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o600)
    state = cp.state()
    state["pids"]["seaweedfs"] = s3.proc.pid if s3.proc else None
    state["pids"]["registry"] = registry.proc.pid if registry.proc else None
    state["node"] = node.state()
    state["network"] = {"ident": cp.network.ident, "subnet": cp.network.subnet}
    pod_endpoint = s3.endpoint_at(cp.network.host_ip)
    state["s3"] = {"endpoint": s3.endpoint, "pod_endpoint": pod_endpoint, "region": s3.region}
    state["registry"] = {"port": registry.port, "pull_prefix": f"localhost:{registry.port}/kubetune"}
    STATE.write_text(json.dumps(state, indent=2))
    (DEV / "s3.env").write_text("".join(f"export {k}={v}\n" for k, v in s3.env().items()))
    (DEV / "s3.env").chmod(0o600)
    print(f"dev cluster up in {time.monotonic() - t0:.1f}s (control plane {cp.startup_seconds:.1f}s)")
    print(f"  export KUBECONFIG={kubeconfig}")
    print(
        f"  nodes: {node.name} (real: containerd + kubelet; plain pods run here) and kwok's fake GPU nodes "
        f"(tainted {FAKE_NODE_TAINT['key']}={FAKE_NODE_TAINT['value']}:NoSchedule; tolerate it to schedule there)"
    )
    print(f"  images: localhost:{registry.port}/kubetune/{{operator,trainer}}:{app_version()}")
    print(f"  S3 endpoint: {s3.endpoint} (from pods: {pod_endpoint}; credentials: source {DEV / 's3.env'})")
    print(f"  logs: {cp.logs}, {node.logs}, {DEV / 's3' / 'logs'}")
    print("  stop it with: make dev-cluster-down")
    return 0


def down() -> int:
    if not STATE.exists():
        print("no dev cluster is running (no .dev/state.json).")
        return 0
    state = json.loads(STATE.read_text())
    if "node" in state:
        RealNode.from_state(state["node"]).stop()
    stopped = stop_from_state(state)
    if "network" in state:
        Network(**state["network"]).delete()
    STATE.unlink()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was still running"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testground")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args()
    try:
        return up() if args.command == "up" else down()
    except TestgroundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
