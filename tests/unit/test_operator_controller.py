"""The controller loop's bookkeeping: phase gauges follow deletions (no cluster)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubetune_operator import metrics
from kubetune_operator.adapterdeployment.reconcile import finetunejob_refs
from kubetune_operator.controller import KindController, Result, Store


def body(name: str, ns: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": ns},
    }


def phase_counts(tracker: metrics.PhaseTracker) -> dict[str, float]:
    [family] = list(tracker.collect())
    return {s.labels["phase"]: s.value for s in family.samples}


def fresh_tracker(monkeypatch, kind: str = "FineTuneJob") -> metrics.PhaseTracker:
    tracker = metrics.PhaseTracker("test_phase", "test")
    monkeypatch.setitem(metrics.PHASES, kind, tracker)
    return tracker


def test_a_deleted_object_leaves_the_phase_gauges(monkeypatch) -> None:
    tracker = fresh_tracker(monkeypatch)

    def reconcile(kube: Any, store: Store, key: tuple[str, str]) -> Result:
        tracker.set(*key, "Succeeded")
        return Result()

    async def main() -> None:
        c = KindController("FineTuneJob", None, reconcile, ThreadPoolExecutor(1))  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(c.worker())
        c.parent_event("ADDED", body("a"))
        c.parent_event("ADDED", body("b"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if phase_counts(tracker).get("Succeeded") == 2:
                break
        assert phase_counts(tracker) == {"Succeeded": 2}
        c.parent_event("DELETED", body("a"))  # deleted by a user or by ttlSecondsAfterFinished
        assert phase_counts(tracker) == {"Succeeded": 1}
        task.cancel()

    asyncio.run(main())


def test_a_reconcile_that_finishes_after_the_deletion_does_not_bring_the_phase_back(monkeypatch) -> None:
    tracker = fresh_tracker(monkeypatch)
    started, release = threading.Event(), threading.Event()

    def reconcile(kube: Any, store: Store, key: tuple[str, str]) -> Result:
        started.set()
        release.wait(5)
        tracker.set(*key, "Running")  # what _write does, after the object is gone
        return Result(requeue_after=0.01)

    async def main() -> None:
        c = KindController("FineTuneJob", None, reconcile, ThreadPoolExecutor(1))  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(c.worker())
        c.parent_event("ADDED", body("gone"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        c.parent_event("DELETED", body("gone"))
        release.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert phase_counts(tracker) == {}
        task.cancel()

    asyncio.run(main())


def test_every_parent_kind_has_a_phase_tracker() -> None:
    assert set(metrics.PHASES) == {"FineTuneJob", "AdapterDeployment", "FineTuneSweep"}


def adep(name: str, *jobs: str, ns: str = "team-a", source: bool = True) -> dict[str, Any]:
    adapters: list[dict[str, Any]] = [{"name": f"a-{j}", "fineTuneJobRef": {"name": j}} for j in jobs]
    if source:
        adapters.append({"name": "static", "source": "s3://adapters/static/"})
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"baseModel": {"uri": "s3://m/base/"}, "adapters": adapters},
    }


def queued(c: KindController) -> set[tuple[str, str]]:
    out = set()
    while len(c.queue):
        key = c.queue._queue.get_nowait()
        c.queue._queued.discard(key)
        out.add(key)
    return out


def adep_controller() -> KindController:
    return KindController(
        "AdapterDeployment",
        None,  # type: ignore[arg-type]
        lambda *a: Result(),
        ThreadPoolExecutor(1),
        refs=finetunejob_refs,
    )


def test_a_finetunejob_event_requeues_only_the_adapterdeployments_that_name_it() -> None:
    c = adep_controller()
    c.parent_event("ADDED", adep("serves-a", "job-a"))
    c.parent_event("ADDED", adep("serves-a-and-b", "job-a", "job-b"))
    c.parent_event("ADDED", adep("static-only"))
    c.parent_event("ADDED", adep("other-ns", "job-a", ns="team-b"))
    queued(c)

    c.requeue_referrers("team-a", "job-a")  # e.g. a progress patch of job-a
    assert queued(c) == {("team-a", "serves-a"), ("team-a", "serves-a-and-b")}
    c.requeue_referrers("team-a", "job-b")
    assert queued(c) == {("team-a", "serves-a-and-b")}
    c.requeue_referrers("team-a", "unrelated")
    assert queued(c) == set()


def test_the_index_follows_spec_changes_and_deletions() -> None:
    c = adep_controller()
    c.parent_event("ADDED", adep("s", "job-a"))
    c.parent_event("MODIFIED", adep("s", "job-b"))  # the adapter now points at another job
    queued(c)
    c.requeue_referrers("team-a", "job-a")
    assert queued(c) == set()
    c.requeue_referrers("team-a", "job-b")
    assert queued(c) == {("team-a", "s")}
    c.parent_event("DELETED", adep("s", "job-b"))
    c.requeue_referrers("team-a", "job-b")
    assert queued(c) == set()
    assert c.store.referrers == {}
