"""The controller loop: caches fed by watch events, a coalescing queue per kind, and workers.

kopf supplies the watches (with re-listing after an API server restart), liveness and logging.
Its handlers only record what they saw and queue the parent's key; each kind's reconcile
function does all the work from the cached state, level-based, so running it twice changes
nothing. Reconciles run in a thread pool because the Kubernetes client is synchronous.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .kube import Kube
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Body = dict[str, Any]


@dataclass
class Result:
    """What a reconcile asks for next: nothing, or another look after `requeue_after` seconds."""

    requeue_after: float | None = None


# The names of the objects (of another kind, in the same namespace) a parent refers to.
RefsFn = Callable[[Body], Iterable[str]]


@dataclass
class Store:
    """Objects of one parent kind and their children, as last seen on the watches.

    With `refs`, also an index of the parents by the objects they refer to (an AdapterDeployment's
    fineTuneJobRefs): `referring_to` answers which parents must hear about such an object.
    """

    parents: dict[Key, Body] = field(default_factory=dict)
    children: dict[str, dict[Key, dict[str, Body]]] = field(default_factory=lambda: defaultdict(dict))
    refs: RefsFn | None = None
    referrers: dict[Key, set[Key]] = field(default_factory=dict)

    def set_parent(self, event_type: str | None, body: Body) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if self.refs is not None:
            self._unindex(key)
        if event_type == "DELETED":
            self.parents.pop(key, None)
        else:
            self.parents[key] = slim("parent", body)
            if self.refs is not None:
                for name in set(self.refs(self.parents[key])):
                    self.referrers.setdefault((key[0], name), set()).add(key)
        return key

    def _unindex(self, key: Key) -> None:
        old = self.parents.get(key)
        if old is None or self.refs is None:
            return
        for name in set(self.refs(old)):
            ref = (key[0], name)
            keys = self.referrers.get(ref)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.referrers[ref]

    def referring_to(self, key: Key) -> list[Key]:
        return sorted(self.referrers.get(key, ()))

    def set_child(self, kind: str, owner_key: Key, event_type: str | None, body: Body) -> None:
        by_owner = self.children[kind].setdefault(owner_key, {})
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            by_owner.pop(name, None)
            if not by_owner:
                self.children[kind].pop(owner_key, None)
        else:
            by_owner[name] = slim(kind, body)

    def children_of(self, kind: str, key: Key) -> list[Body]:
        return list(self.children[kind].get(key, {}).values())


ReconcileFn = Callable[[Kube, Store, Key], Result]


def _pick(d: Body | None, *keys: str) -> Body:
    return {k: d[k] for k in keys if d and k in d}


def slim(kind: str, body: Body) -> Body:
    """Keep only what the reconcilers read: at 1000 jobs, full pods and Jobs (managedFields,
    pod templates) would be most of the operator's memory."""
    meta = body.get("metadata") or {}
    out: Body = {
        "metadata": _pick(
            meta, "name", "namespace", "uid", "generation", "labels", "annotations", "deletionTimestamp"
        )
    }
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if kind == "Pod":
        out["spec"] = _pick(spec, "nodeName")
        out["status"] = _pick(status, "phase", "conditions")
        out["status"]["containerStatuses"] = [
            _pick(cs, "name", "state") for cs in status.get("containerStatuses") or []
        ]
    elif kind == "Job":
        out["spec"] = _pick(spec, "suspend")
        out["status"] = _pick(status, "conditions", "active", "succeeded", "failed")
    elif kind == "Deployment":
        out["spec"] = _pick(spec, "replicas")
        out["status"] = dict(status)
    else:
        return {k: v for k, v in body.items() if k != "metadata"} | {
            "metadata": {k: v for k, v in meta.items() if k != "managedFields"}
        }
    return out


class KindController:
    """Queue + workers for one parent kind."""

    def __init__(
        self,
        kind: str,
        kube: Kube,
        reconcile: ReconcileFn,
        executor: ThreadPoolExecutor,
        refs: RefsFn | None = None,
    ) -> None:
        self.kind = kind
        self.kube = kube
        self.reconcile = reconcile
        self.store = Store(refs=refs)
        self.queue = WorkQueue()
        self.executor = executor

    def parent_event(self, event_type: str | None, body: Body) -> None:
        key = self.store.set_parent(event_type, body)
        if event_type == "DELETED":
            self.queue.forget(key)
            # Deleted (by a user, or by ttlSecondsAfterFinished): no longer in the phase gauges.
            metrics.forget_phase(self.kind, *key)
        else:
            self.queue.add(key)

    def child_event(self, child_kind: str, owner_label: str, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata", {})
        owner = (meta.get("labels") or {}).get(owner_label)
        if not owner:
            return
        key = (meta["namespace"], owner)
        self.store.set_child(child_kind, key, event_type, body)
        if key in self.store.parents:
            self.queue.add(key)

    def requeue_referrers(self, namespace: str, name: str) -> None:
        """Queue the parents that refer to this object (see Store.refs), and no others."""
        for key in self.store.referring_to((namespace, name)):
            if key in self.store.parents:
                self.queue.add(key)

    def resync(self) -> None:
        for key in list(self.store.parents):
            self.queue.add(key)

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            metrics.QUEUE_DEPTH.labels(self.kind).set(len(self.queue))
            if key not in self.store.parents:
                self.queue.done(key)
                continue
            t0 = time.perf_counter()
            try:
                result = await loop.run_in_executor(self.executor, self.reconcile, self.kube, self.store, key)
            except Exception:
                log.exception("reconcile of %s %s/%s failed; retrying with backoff", self.kind, *key)
                metrics.RECONCILES.labels(self.kind, "error").inc()
                self.queue.done(key, failed=True)
                continue
            finally:
                metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - t0)
                if key not in self.store.parents:
                    # Deleted while it was being reconciled, which may have set its phase again.
                    metrics.forget_phase(self.kind, *key)
            self.queue.done(key)
            if result.requeue_after is not None:
                metrics.RECONCILES.labels(self.kind, "requeue").inc()
                self.queue.add_after(key, result.requeue_after)
            else:
                metrics.RECONCILES.labels(self.kind, "success").inc()
