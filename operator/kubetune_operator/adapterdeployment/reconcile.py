"""Reconcile one AdapterDeployment: resolve its adapters, converge Deployment/Service/HPA, report.

Adapters with a fineTuneJobRef resolve to that job's status.output.adapterUri once it has
Succeeded; adapters with a fineTuneSweepRef to the sweep's status.bestTrial.adapterUri once the
sweep has Succeeded. Until then the server runs with the adapters that are resolved (the others
are listed in status with why they are not ready); a referenced job or sweep that failed makes
the AdapterDeployment Degraded with its reason.
"""

from __future__ import annotations

from typing import Any

from .. import meta, metrics
from ..conditions import get_condition, now_iso, set_condition
from ..controller import Key, Result, Store
from ..kube import Kube
from ..settings import Settings, load
from . import builders

Body = dict[str, Any]
KIND = "AdapterDeployment"

_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load()
    return _settings


def finetunejob_refs(adep: Body) -> list[str]:
    """The FineTuneJobs and FineTuneSweeps (same namespace) whose adapters this AdapterDeployment
    serves: the names its adapters refer to (the controller requeues it when one changes)."""
    return [
        ref["name"]
        for a in (adep.get("spec") or {}).get("adapters") or []
        for field in ("fineTuneJobRef", "fineTuneSweepRef")
        if isinstance(ref := a.get(field), dict) and ref.get("name")
    ]


def _lora_rank(job: Body | None) -> int | None:
    lora = (((job or {}).get("spec") or {}).get("method") or {}).get("lora") or {}
    return lora.get("r") if isinstance(lora, dict) else None


def resolve_sweep(
    kube: Kube, ns: str, name: str, ref: str
) -> tuple[builders.ResolvedAdapter | None, Body, str | None]:
    """(the best trial's adapter or None, the adapter's status, a failure message or None)."""
    sweep = kube.get(meta.API_VERSION, "FineTuneSweep", ns, ref)
    if sweep is None:
        return (
            None,
            {"name": name, "ready": False, "message": f"FineTuneSweep {ref} not found in namespace {ns}"},
            None,
        )
    st = sweep.get("status") or {}
    phase = st.get("phase") or "Pending"
    best = st.get("bestTrial") or {}
    uri = best.get("adapterUri")
    if phase == "Succeeded" and uri:
        rank = _lora_rank(kube.get(meta.API_VERSION, "FineTuneJob", ns, best.get("name", "")))
        status = {"name": name, "uri": uri, "ready": False, "message": "waiting for the server"}
        return builders.ResolvedAdapter(name, uri, rank), status, None
    if phase in ("Succeeded", "Failed"):
        reason = next((c.get("message") for c in st.get("conditions") or [] if c.get("type") == "Failed"), "")
        msg = f"FineTuneSweep {ref} failed: {reason or 'no best trial with an adapter'}"
        return None, {"name": name, "ready": False, "message": msg}, msg
    done = f", {st['completed']} trials finished" if st.get("completed") else ""
    msg = f"waiting for FineTuneSweep {ref} to succeed (now {phase}{done})"
    return None, {"name": name, "ready": False, "message": msg}, None


def resolve(kube: Kube, adep: Body) -> tuple[list[builders.ResolvedAdapter], list[Body], list[str]]:
    """-> (resolved adapters, per-adapter status, failed-job messages)."""
    ns = adep["metadata"]["namespace"]
    resolved: list[builders.ResolvedAdapter] = []
    statuses: list[Body] = []
    failures: list[str] = []
    for a in adep["spec"].get("adapters") or []:
        name = a["name"]
        if a.get("source"):
            resolved.append(builders.ResolvedAdapter(name, a["source"], a.get("rank")))
            statuses.append(
                {"name": name, "uri": a["source"], "ready": False, "message": "waiting for the server"}
            )
            continue
        if a.get("fineTuneSweepRef"):
            adapter, st, failure = resolve_sweep(kube, ns, name, a["fineTuneSweepRef"].get("name", ""))
            if adapter is not None:
                resolved.append(adapter)
            if failure:
                failures.append(failure)
            statuses.append(st)
            continue
        ref = (a.get("fineTuneJobRef") or {}).get("name", "")
        job = kube.get(meta.API_VERSION, "FineTuneJob", ns, ref)
        if job is None:
            statuses.append(
                {"name": name, "ready": False, "message": f"FineTuneJob {ref} not found in namespace {ns}"}
            )
            continue
        st = job.get("status") or {}
        phase = st.get("phase") or "Pending"
        uri = (st.get("output") or {}).get("adapterUri")
        if phase == "Succeeded" and uri:
            rank = ((job.get("spec") or {}).get("method") or {}).get("lora", {}) or {}
            resolved.append(
                builders.ResolvedAdapter(name, uri, rank.get("r") if isinstance(rank, dict) else None)
            )
            statuses.append({"name": name, "uri": uri, "ready": False, "message": "waiting for the server"})
        elif phase == "Failed":
            reason = next(
                (c.get("message") for c in st.get("conditions") or [] if c.get("type") == "Failed"), phase
            )
            msg = f"FineTuneJob {ref} failed: {reason}"
            failures.append(msg)
            statuses.append({"name": name, "ready": False, "message": msg})
        else:
            pct = (st.get("progress") or {}).get("percent")
            progress = f", {pct:.0f}% done" if isinstance(pct, int | float) else ""
            statuses.append(
                {
                    "name": name,
                    "ready": False,
                    "message": f"waiting for FineTuneJob {ref} to succeed (now {phase}{progress})",
                }
            )
    return resolved, statuses, failures


HOT_RELOAD_SERVED = (
    "published to the ready servers for hot reload; each pod's adapter-sync loads it within about a "
    "minute (its status file says when)"
)


def server_problem(dep: Body, status: Body, ready: int, want: int) -> tuple[str, str] | None:
    """(reason, message) when the server itself is failing, read from its Deployment.

    - ReplicaFailure=True: pods cannot even be created (quota, admission, ...);
    - Progressing=False/ProgressDeadlineExceeded: the rollout made no progress within
      progressDeadlineSeconds (pods that never schedule or never become ready);
    - no ready replica left in a deployment that was serving (condition Available=True, or
      already Degraded for this reason): ServerUnavailable.
    The Deployment's conditions count only once its controller has seen the current generation
    (a condition of the previous rollout says nothing about this one).
    """
    name = dep["metadata"]["name"]
    dst = dep.get("status") or {}
    current = int(dst.get("observedGeneration") or 0) >= int(dep["metadata"].get("generation") or 0)
    if current:
        failure = get_condition(dst.get("conditions"), "ReplicaFailure")
        if failure and failure.get("status") == "True":
            why = failure.get("message") or failure.get("reason") or "pods cannot be created"
            return "ReplicaFailure", f"Deployment {name} cannot create its pods: {why}"
        progressing = get_condition(dst.get("conditions"), "Progressing")
        if (
            progressing
            and progressing.get("status") == "False"
            and progressing.get("reason") == "ProgressDeadlineExceeded"
        ):
            why = progressing.get("message") or "the rollout exceeded its progress deadline"
            return "ProgressDeadlineExceeded", f"{why} ({ready}/{want} replicas ready)"
    available = get_condition(status.get("conditions"), "Available")
    was_serving = (available or {}).get("status") == "True" or (available or {}).get(
        "reason"
    ) == "ServerUnavailable"
    if want > 0 and ready == 0 and was_serving:
        return (
            "ServerUnavailable",
            f"no server pod is ready (0/{want} replicas ready); the adapters are not served",
        )
    return None


def reconcile(kube: Kube, store: Store, key: Key) -> Result:
    adep = store.parents[key]
    status: Body = dict(adep.get("status") or {})
    generation = adep["metadata"].get("generation")
    s = settings()
    resolved, adapter_status, failures = resolve(kube, adep)

    kube.apply(builders.config_map(adep, resolved))
    kube.apply(builders.service(adep))
    dep = kube.apply(builders.deployment(adep, resolved, s))
    h = builders.hpa(adep)
    if h is not None:
        kube.apply(h)
    elif status.get("observedGeneration") != generation:
        # Autoscaling may just have been turned off: remove a leftover HPA (once per spec change).
        kube.delete("autoscaling/v2", "HorizontalPodAutoscaler", key[0], builders.names(adep)["hpa"])
    policy = builders.network_policy(adep)
    if policy is not None:
        kube.apply(policy)
    elif status.get("observedGeneration") != generation:
        # spec.networkPolicy may just have been removed (once per spec change, as the HPA).
        kube.delete("networking.k8s.io/v1", "NetworkPolicy", key[0], builders.names(adep)["network_policy"])

    # Prefer the watch's view (fresher status) when it is at least as new as what we applied.
    watched = {d["metadata"]["name"]: d for d in store.children_of("Deployment", key)}.get(
        dep["metadata"]["name"]
    )
    if watched and int(watched["metadata"].get("generation", 0)) >= int(dep["metadata"].get("generation", 0)):
        dep = watched
    dst = dep.get("status") or {}
    want = int((dep.get("spec") or {}).get("replicas") or 1)
    ready = int(dst.get("readyReplicas") or 0)
    updated = int(dst.get("updatedReplicas") or 0)
    rolled_out = (
        int(dst.get("observedGeneration") or 0) >= int(dep["metadata"].get("generation") or 0)
        and updated >= want
        and int(dst.get("availableReplicas") or 0) >= want
        and int(dst.get("replicas") or 0) == updated
    )
    # With hotReload the pods load a changed set themselves (adapter-sync): the operator sees the
    # set published and the servers ready, not each pod's load, and says so.
    served = HOT_RELOAD_SERVED if (adep.get("spec") or {}).get("hotReload") else "served"
    problem = server_problem(dep, status, ready, want)
    for a in adapter_status:
        if "uri" in a:
            a["ready"] = rolled_out and ready > 0
            if a["ready"]:
                a["message"] = served
            elif problem is not None:
                a["message"] = f"server unavailable ({problem[0]})"
            else:
                a["message"] = "rolling out" if ready else "waiting for a ready server pod"
    conditions = status.get("conditions") or []
    pending = [a for a in adapter_status if "uri" not in a]
    if failures:
        phase = "Degraded"
        conditions = set_condition(
            conditions,
            "AdaptersResolved",
            False,
            "FineTuneJobFailed"
            if any(f.startswith("FineTuneJob ") for f in failures)
            else "FineTuneSweepFailed",
            "; ".join(failures),
            generation,
        )
    elif pending:
        phase = "Progressing"
        conditions = set_condition(
            conditions,
            "AdaptersResolved",
            False,
            "WaitingForFineTuneJob"
            if any("FineTuneJob " in a["message"] for a in pending)
            else "WaitingForFineTuneSweep",
            "; ".join(a["message"] for a in pending),
            generation,
        )
    else:
        conditions = set_condition(
            conditions,
            "AdaptersResolved",
            True,
            "Resolved",
            f"{len(resolved)} adapter(s) resolved",
            generation,
        )
        phase = "Ready" if rolled_out and ready >= want else "Progressing"
    available = rolled_out and ready >= want
    if problem is not None:
        # The server itself is failing: Degraded, whatever the adapters (Argo CD shows the reason).
        phase = "Degraded"
        conditions = set_condition(conditions, "Available", False, problem[0], problem[1], generation)
    else:
        conditions = set_condition(
            conditions,
            "Available",
            available,
            "MinimumReplicasAvailable" if available else "RollingOut",
            f"{ready}/{want} replicas ready" + ("" if rolled_out else ", rollout in progress"),
            generation,
        )
    if phase == "Ready" and failures:
        phase = "Degraded"
    new: Body = {
        "observedGeneration": generation,
        "phase": phase,
        "readyReplicas": ready,
        "replicas": want,
        "adapters": adapter_status,
        "readyAdapters": f"{sum(1 for a in adapter_status if a['ready'])}/{len(adapter_status)}",
        "endpoint": builders.endpoint(adep),
        "conditions": conditions,
    }
    changed = {k: v for k, v in new.items() if status.get(k) != v}
    metrics.ADAPTERDEPLOYMENTS_PHASE.set(key[0], key[1], phase)
    if changed:
        kube.patch_status(adep["apiVersion"], KIND, key[0], key[1], changed)
        if status.get("phase") != phase:
            summary = f"{ready}/{want} replicas ready; {len(resolved)} adapter(s) resolved at {now_iso()}"
            kube.post_event(
                adep,
                phase,
                f"{problem[0]}: {problem[1]}" if problem else summary,
                "Warning" if phase == "Degraded" else "Normal",
            )
    # Waiting on a FineTuneJob: its events requeue us, but look again now and then anyway.
    # (A Degraded server needs nothing: its Deployment's and pods' changes are Deployment events.)
    return Result(requeue_after=30.0 if pending else None)
