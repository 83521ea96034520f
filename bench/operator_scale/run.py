"""Operator scale benchmark: N FineTuneJobs through the operator vs N Jobs from a bare client.

For each N (default 200 and 1000), on a fresh local control plane with enough fake nodes:
  baseline: a bare client creates N Indexed Jobs (the same template the operator renders, but
            without kubetune's labels, so the operator started afterwards neither sees nor caches
            them); time until every Job exists and every pod is Running.
  operator: kubectl-equivalent creation of N FineTuneJobs; time until every Job exists and
            every FineTuneJob's status.phase is Running (written by the operator).
Both phases run in one process, one after the other, on the same cluster. Prints the ratio
and the operator's peak RSS (VmHWM from /proc). Targets: ratio <= 2 at N = 1000, RSS <= 200 MB.

    .venv/bin/python -m bench.operator_scale.run [--n 200 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402

from kubetune_operator.finetunejob import builders  # noqa: E402
from kubetune_operator.settings import Settings  # noqa: E402
from tests.testground.cluster import ControlPlane, node  # noqa: E402
from tests.testground.operator import OperatorProcess  # noqa: E402

HOLD = {"kwok.kubetune.io/outcome": "hold"}
BASELINE = {"bench/baseline": "true"}


def ftj_manifest(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny"},
            "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
            "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "10m", "memory": "16Mi"},
            "storage": {"uri": "s3://ckpt/runs", "secretRef": {"name": "s3"}},
            "podMetadata": {"labels": HOLD},
        },
    }


def baseline_job(ns: str, name: str) -> dict:
    """The Job the operator would render for the same FineTuneJob (without its other children)."""
    parent = ftj_manifest(name)
    parent["metadata"].update(namespace=ns, uid="00000000-0000-0000-0000-000000000000")
    job = builders.job(parent, 1, Settings())
    job["metadata"].pop("ownerReferences")
    job["metadata"]["name"] = name
    # No kubetune labels on the Job or its pods: the operator must not see (and cache) the
    # baseline's N Jobs and pods while it is measured.
    job["metadata"]["labels"] = dict(BASELINE)
    template = job["spec"]["template"]["metadata"]
    template["labels"] = {**HOLD, **BASELINE}
    # The operator also creates the per-job ServiceAccount; the bare client uses the default one.
    job["spec"]["template"]["spec"]["serviceAccountName"] = "default"
    return job


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def count_running_pods(core: client.CoreV1Api, ns: str) -> int:
    pods = core.list_namespaced_pod(ns, label_selector="kwok.kubetune.io/outcome=hold").items
    return sum(1 for p in pods if p.status.phase == "Running")


def run_baseline(cp: ControlPlane, n: int, threads: int) -> float:
    ns = f"baseline-{n}"
    cp.kubectl("create", "namespace", ns)
    api = cp.api_client()
    api.configuration.connection_pool_maxsize = threads
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: batch.create_namespaced_job(ns, baseline_job(ns, f"job-{i}")), range(n)))
    wait_until(lambda: count_running_pods(core, ns) >= n, timeout=1800, what=f"{n} baseline pods Running")
    return time.monotonic() - t0


def run_operator(cp: ControlPlane, n: int, threads: int, op: OperatorProcess) -> float:
    ns = f"operator-{n}"
    cp.kubectl("create", "namespace", ns)
    api = cp.api_client()
    api.configuration.connection_pool_maxsize = threads
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)

    def all_running() -> bool:
        items = custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs")["items"]
        running = sum(1 for i in items if (i.get("status") or {}).get("phase") == "Running")
        return running >= n and len(batch.list_namespaced_job(ns).items) >= n

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda i: custom.create_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", ns, "finetunejobs", ftj_manifest(f"ftj-{i}")
                ),
                range(n),
            )
        )
    wait_until(all_running, timeout=1800, what=f"{n} FineTuneJobs Running")
    return time.monotonic() - t0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--threads", type=int, default=16, help="client threads creating objects (both phases)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = []
    for n in args.n:
        # Enough fake nodes for N pods (110 pods each) beside the default three.
        # Both phases keep their pods Running (held), so room for 2N pods (110 per node).
        extra = [node(f"bench-node-{i}", cpu="1000", memory="4Ti") for i in range(2 * n // 100 + 1)]
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
            cp = ControlPlane(Path(tmp) / "cluster")
            cp.nodes = cp.nodes + extra
            cp.start()
            try:
                for crd in sorted((REPO / "crds").glob("*.yaml")):
                    cp.kubectl("apply", "--server-side", "-f", str(crd))
                cp.kubectl(
                    "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
                )
                base = run_baseline(cp, n, args.threads)
                op = OperatorProcess(cp.kubeconfig, Path(tmp) / "operator", resync_seconds=300).start()
                try:
                    opt = run_operator(cp, n, args.threads, op)
                    rss = peak_rss_mb(op.proc.pid) if op.proc else float("nan")
                finally:
                    op.stop()
            finally:
                cp.stop()
        row = {
            "n": n,
            "baseline_s": round(base, 2),
            "operator_s": round(opt, 2),
            "ratio": round(opt / base, 2),
            "operator_peak_rss_mb": round(rss, 1),
        }
        results.append(row)
        print(
            f"N={n:5d}  baseline {base:7.1f}s  operator {opt:7.1f}s  ratio {opt / base:5.2f}  "
            f"operator peak RSS {rss:6.1f} MB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
