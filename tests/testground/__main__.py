"""`make dev-cluster` / `make dev-cluster-down`: the test ground as a long-lived local cluster.

python -m tests.testground up     # start control plane + SeaweedFS in the background
python -m tests.testground down   # stop every process `up` started
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from .cluster import REPO, ControlPlane, stop_from_state
from .procs import TestgroundError
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
    cp = ControlPlane(DEV / "cluster").start()
    try:
        s3 = SeaweedS3(DEV / "s3").start()
    except BaseException:
        cp.stop()
        raise
    kubeconfig = DEV / "kubeconfig"
    shutil.copy(cp.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o600)
    state = cp.state()
    state["pids"]["seaweedfs"] = s3.proc.pid if s3.proc else None
    state["s3"] = {"endpoint": s3.endpoint, "region": s3.region}
    STATE.write_text(json.dumps(state, indent=2))
    (DEV / "s3.env").write_text("".join(f"export {k}={v}\n" for k, v in s3.env().items()))
    (DEV / "s3.env").chmod(0o600)
    print(f"dev cluster up in {time.monotonic() - t0:.1f}s (control plane {cp.startup_seconds:.1f}s)")
    print(f"  export KUBECONFIG={kubeconfig}")
    print(f"  S3 endpoint: {s3.endpoint}   (credentials: source {DEV / 's3.env'})")
    print(f"  logs: {cp.logs} and {DEV / 's3' / 'logs'}")
    print("  stop it with: make dev-cluster-down")
    return 0


def down() -> int:
    if not STATE.exists():
        print("no dev cluster is running (no .dev/state.json).")
        return 0
    state = json.loads(STATE.read_text())
    stopped = stop_from_state(state)
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
