"""`kubetune operator`: run the kopf operator.

Handlers here are thin: they record what the watch saw and queue the parent for a reconcile.
They return None, so kopf writes nothing into the objects' status; the operator uses only
watch-event handlers (no timers, daemons or deletion handlers), so kopf adds no finalizers and
no annotations either. Deleting a parent is left to Kubernetes' garbage collector.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from prometheus_client import start_http_server

from . import meta
from .controller import KindController
from .kube import Kube

log = logging.getLogger("kubetune_operator")
# Worker and resync tasks live as long as the operator; keep references so they are not collected.
_background: set[asyncio.Task[None]] = set()


def build_api_client(kubeconfig: str | None = None, pool_size: int = 32):
    from kubernetes import client, config

    cfg = client.Configuration()
    cfg.connection_pool_maxsize = pool_size  # one connection per concurrent reconcile
    if kubeconfig or os.environ.get("KUBECONFIG"):
        config.load_kube_config(config_file=kubeconfig or os.environ["KUBECONFIG"], client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def connection_info(cfg: Any) -> kopf.ConnectionInfo:
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or ("Bearer" if token else None),
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


# Server-side label selectors for the child watches: the API server sends only the objects the
# operator created (every child carries these labels, see meta.child_labels). Without them kopf
# lists and streams every Job and Pod in the cluster, and keeps per-object state for each one
# before the handlers' own label filters drop them.
FINETUNEJOB_CHILDREN = f"{meta.LABEL_FINETUNEJOB},{meta.LABEL_MANAGED_BY}={meta.MANAGED_BY}"
ADAPTERDEPLOYMENT_CHILDREN = f"{meta.LABEL_ADAPTERDEPLOYMENT},{meta.LABEL_MANAGED_BY}={meta.MANAGED_BY}"
CHILD_WATCHES: dict[tuple[str, str], str] = {
    ("batch", "jobs"): FINETUNEJOB_CHILDREN,
    ("v1", "pods"): FINETUNEJOB_CHILDREN,
    ("apps", "deployments"): ADAPTERDEPLOYMENT_CHILDREN,
}


def watch_only_owned_children(settings: kopf.OperatorSettings) -> None:
    for resource, selector in CHILD_WATCHES.items():
        settings.watching.label_selectors[resource] = selector


def make_registry(
    controllers: dict[str, KindController], resync_seconds: float, api_client: Any, workers: int = 16
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    ftj = controllers["FineTuneJob"]
    adep = controllers.get("AdapterDeployment")
    sweep = controllers.get("FineTuneSweep")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # kopf's watches use exactly the credentials of the reconcilers' client.
        return connection_info(api_client.configuration)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 10
        settings.networking.error_backoffs = [1, 2, 5, 10]
        settings.batching.batch_window = 0.05
        # kopf keeps a worker (and the last full object) per watched object until it idles out:
        # with thousands of pods and Jobs that is most of the operator's memory, so let them go soon.
        settings.batching.idle_timeout = 0.5
        # Watch exactly the resources registered here: no CRD/namespace discovery, no extra RBAC.
        settings.scanning.disabled = True
        watch_only_owned_children(settings)
        loop = asyncio.get_running_loop()
        for c in controllers.values():
            for _worker in range(workers):
                _background.add(loop.create_task(c.worker()))

        async def resync() -> None:
            while True:
                await asyncio.sleep(resync_seconds)
                for c in controllers.values():
                    c.resync()

        _background.add(loop.create_task(resync()))

    # The event handlers are coroutines on purpose: kopf runs plain functions in a thread pool,
    # and the work queues (asyncio, not thread-safe) and the stores are written only on the event loop.
    @kopf.on.event(meta.GROUP, meta.VERSION, "finetunejobs", registry=registry)
    async def finetunejob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        ftj.parent_event(type, dict(body))
        # FineTuneJobs that continue this one's adapter (baseModel.initAdapter.fineTuneJobRef) wait for it.
        ftj.requeue_referrers(body["metadata"]["namespace"], body["metadata"]["name"])

    @kopf.on.event("batch", "v1", "jobs", labels={meta.LABEL_FINETUNEJOB: kopf.PRESENT}, registry=registry)
    async def job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        ftj.child_event("Job", meta.LABEL_FINETUNEJOB, type, dict(body))

    @kopf.on.event("", "v1", "pods", labels={meta.LABEL_FINETUNEJOB: kopf.PRESENT}, registry=registry)
    async def ftj_pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        ftj.child_event("Pod", meta.LABEL_FINETUNEJOB, type, dict(body))

    if adep is not None:

        @kopf.on.event(meta.GROUP, meta.VERSION, "adapterdeployments", registry=registry)
        async def adapterdeployment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
            adep.parent_event(type, dict(body))

        @kopf.on.event(
            "apps",
            "v1",
            "deployments",
            labels={meta.LABEL_ADAPTERDEPLOYMENT: kopf.PRESENT},
            registry=registry,
        )
        async def deployment_event(type: str | None, body: kopf.Body, **_: Any) -> None:
            adep.child_event("Deployment", meta.LABEL_ADAPTERDEPLOYMENT, type, dict(body))

        # An AdapterDeployment that points at a FineTuneJob must hear when that job changes; only
        # those whose adapters name it (an index kept from the cache, see Store.refs), not every
        # AdapterDeployment of the namespace on each progress patch.
        @kopf.on.event(
            meta.GROUP, meta.VERSION, "finetunejobs", registry=registry, id="finetunejob_for_adapters"
        )
        async def finetunejob_for_adapters(body: kopf.Body, **_: Any) -> None:
            adep.requeue_referrers(body["metadata"]["namespace"], body["metadata"]["name"])

    if sweep is not None:

        @kopf.on.event(meta.GROUP, meta.VERSION, "finetunesweeps", registry=registry)
        async def finetunesweep_event(type: str | None, body: kopf.Body, **_: Any) -> None:
            sweep.parent_event(type, dict(body))

        # A sweep's trials are FineTuneJobs labelled with the sweep: their phase and progress
        # (the evaluations early stopping reads) requeue the sweep.
        @kopf.on.event(
            meta.GROUP,
            meta.VERSION,
            "finetunejobs",
            labels={meta.LABEL_FINETUNESWEEP: kopf.PRESENT},
            registry=registry,
            id="finetunejob_for_sweeps",
        )
        async def trial_event(type: str | None, body: kopf.Body, **_: Any) -> None:
            sweep.child_event("FineTuneJob", meta.LABEL_FINETUNESWEEP, type, dict(body))

        if adep is not None:
            # AdapterDeployments serving a sweep's best trial (fineTuneSweepRef) hear when it changes.
            @kopf.on.event(
                meta.GROUP, meta.VERSION, "finetunesweeps", registry=registry, id="finetunesweep_for_adapters"
            )
            async def finetunesweep_for_adapters(body: kopf.Body, **_: Any) -> None:
                adep.requeue_referrers(body["metadata"]["namespace"], body["metadata"]["name"])

    return registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, else in-cluster)"
    )
    p.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        default=None,
        help="watch only this namespace (repeatable; default: all namespaces, or $KUBETUNE_WATCH_NAMESPACES)",
    )
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("KUBETUNE_METRICS_PORT", "8080")))
    p.add_argument("--health-port", type=int, default=int(os.environ.get("KUBETUNE_HEALTH_PORT", "8081")))
    p.add_argument(
        "--resync-seconds", type=float, default=float(os.environ.get("KUBETUNE_RESYNC_SECONDS", "60"))
    )
    p.add_argument("--workers", type=int, default=16, help="concurrent reconciles per kind")
    p.add_argument("--verbose", action="store_true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubetune operator", description="Run the kubetune operator.")
    add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf reports every handler call at INFO; ours only queue work, so that is noise.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # One line per kubelet probe (every 10 s, twice) would bury everything else in the pod log.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    namespaces = args.namespaces or [
        n.strip() for n in os.environ.get("KUBETUNE_WATCH_NAMESPACES", "").split(",") if n.strip()
    ]

    from .adapterdeployment.reconcile import finetunejob_refs
    from .adapterdeployment.reconcile import reconcile as reconcile_adapterdeployment
    from .finetunejob.init_adapter import init_adapter_refs
    from .finetunejob.reconcile import reconcile as reconcile_finetunejob
    from .finetunesweep.reconcile import reconcile as reconcile_finetunesweep

    api_client = build_api_client(args.kubeconfig, pool_size=2 * args.workers)
    kube = Kube(api_client)
    executor = ThreadPoolExecutor(max_workers=2 * args.workers, thread_name_prefix="reconcile")
    controllers = {
        "FineTuneJob": KindController(
            "FineTuneJob", kube, reconcile_finetunejob, executor, refs=init_adapter_refs
        ),
        "AdapterDeployment": KindController(
            "AdapterDeployment", kube, reconcile_adapterdeployment, executor, refs=finetunejob_refs
        ),
        "FineTuneSweep": KindController("FineTuneSweep", kube, reconcile_finetunesweep, executor),
    }
    registry = make_registry(controllers, args.resync_seconds, api_client, args.workers)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    log.info(
        "kubetune operator starting (namespaces: %s, metrics :%s, health :%s)",
        ", ".join(namespaces) or "all",
        args.metrics_port,
        args.health_port,
    )
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
