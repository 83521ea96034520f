"""Reconcile one AdapterDeployment: resolve its adapters, converge Deployment/Service/HPA, report.

Adapters with a fineTuneJobRef resolve to that job's status.output.adapterUri once it has
Succeeded; adapters with a fineTuneSweepRef to the sweep's status.bestTrial.adapterUri once the
sweep has Succeeded. Until then the server runs with the adapters that are resolved (the others
are listed in status with why they are not ready); a referenced job or sweep that failed makes
the AdapterDeployment Degraded with its reason. Referenced objects are read as typed API models.

A finished job's status.output says what it saved (method, LoRA rank, as the trainer read them
back from the adapter): the rank sizes vLLM's LoRA slots, and an output the runtime cannot serve
(a full model, prefix/prompt/P-tuning) is refused with AdaptersResolved=False/UnservableAdapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import meta, metrics
from ..api import (
    AdapterDeploymentSpec,
    FineTuneJob,
    InvalidManifestError,
    load_finetunejob,
    load_finetunesweep,
)
from ..api.adapterdeployment import Adapter
from ..api.common import Condition
from ..api.finetunejob import FineTuneJobStatus
from ..api.finetunesweep import FineTuneSweepStatus
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


@dataclass
class Resolution:
    """What the adapter list resolves to now."""

    adapters: list[builders.ResolvedAdapter] = field(default_factory=list)
    statuses: list[Body] = field(default_factory=list)  # per adapter, in spec order
    failures: list[str] = field(default_factory=list)  # referenced jobs or sweeps that failed
    unservable: list[str] = field(default_factory=list)  # outputs the runtime cannot serve


def _failed_message(conditions: list[Condition] | None, default: str) -> str:
    return next((c.message for c in conditions or [] if c.type == "Failed" and c.message), default)


def _typed_job(kube: Kube, ns: str, name: str) -> FineTuneJob | None:
    body = kube.get(meta.API_VERSION, "FineTuneJob", ns, name)
    return None if body is None else load_finetunejob(body)


def _resolve_output(
    res: Resolution, adapter: Adapter, runtime: str, what: str, job: FineTuneJob | None, uri: str
) -> None:
    """A finished job's output (``what`` names where it came from): served when the runtime can."""
    output = job.status.output if job is not None and job.status is not None else None
    trained = builders.trained_output(job.spec.method if job is not None else None, output)
    refusal = builders.unservable(runtime, trained, what, uri)
    if refusal is not None:
        res.unservable.append(refusal)
        res.statuses.append({"name": adapter.name, "ready": False, "message": refusal})
        return
    res.adapters.append(builders.ResolvedAdapter(adapter.name, uri, adapter.rank or trained.rank))
    res.statuses.append(
        {"name": adapter.name, "uri": uri, "ready": False, "message": "waiting for the server"}
    )


def _waiting(res: Resolution, adapter: Adapter, message: str) -> None:
    res.statuses.append({"name": adapter.name, "ready": False, "message": message})


def _failed(res: Resolution, adapter: Adapter, message: str) -> None:
    res.failures.append(message)
    _waiting(res, adapter, message)


def _resolve_job(kube: Kube, ns: str, res: Resolution, adapter: Adapter, runtime: str, ref: str) -> None:
    try:
        job = _typed_job(kube, ns, ref)
    except InvalidManifestError as e:
        return _failed(res, adapter, f"FineTuneJob {ref} cannot be read: {e}")
    if job is None:
        return _waiting(res, adapter, f"FineTuneJob {ref} not found in namespace {ns}")
    st = job.status or FineTuneJobStatus()
    phase = st.phase or "Pending"
    uri = st.output.adapter_uri if st.output is not None else None
    if phase == "Succeeded" and uri:
        return _resolve_output(res, adapter, runtime, f"FineTuneJob {ref}", job, uri)
    if phase == "Failed":
        return _failed(res, adapter, f"FineTuneJob {ref} failed: {_failed_message(st.conditions, phase)}")
    pct = st.progress.percent if st.progress is not None else None
    progress = f", {pct:.0f}% done" if pct is not None else ""
    _waiting(res, adapter, f"waiting for FineTuneJob {ref} to succeed (now {phase}{progress})")


def _resolve_sweep(kube: Kube, ns: str, res: Resolution, adapter: Adapter, runtime: str, ref: str) -> None:
    body = kube.get(meta.API_VERSION, "FineTuneSweep", ns, ref)
    if body is None:
        return _waiting(res, adapter, f"FineTuneSweep {ref} not found in namespace {ns}")
    try:
        st = load_finetunesweep(body).status or FineTuneSweepStatus()
    except InvalidManifestError as e:
        return _failed(res, adapter, f"FineTuneSweep {ref} cannot be read: {e}")
    phase = st.phase or "Pending"
    best = st.best_trial
    if phase == "Succeeded" and best is not None and best.adapter_uri:
        try:
            trial = _typed_job(kube, ns, best.name)
        except InvalidManifestError:
            trial = None  # the trial's report is a refinement: without it, serve what the sweep says
        what = f"FineTuneSweep {ref}'s best trial {best.name}"
        return _resolve_output(res, adapter, runtime, what, trial, best.adapter_uri)
    if phase in ("Succeeded", "Failed"):
        reason = _failed_message(st.conditions, "no best trial with an adapter")
        return _failed(res, adapter, f"FineTuneSweep {ref} failed: {reason}")
    done = f", {st.completed} trials finished" if st.completed else ""
    _waiting(res, adapter, f"waiting for FineTuneSweep {ref} to succeed (now {phase}{done})")


def resolve(kube: Kube, adep: Body) -> Resolution:
    """The adapters as the runtime will serve them, each adapter's status, and what went wrong."""
    ns = adep["metadata"]["namespace"]
    spec = AdapterDeploymentSpec.model_validate(adep["spec"], by_alias=True, by_name=False)
    res = Resolution()
    for a in spec.adapters or []:
        if a.source:
            res.adapters.append(builders.ResolvedAdapter(a.name, a.source, a.rank))
            res.statuses.append(
                {"name": a.name, "uri": a.source, "ready": False, "message": "waiting for the server"}
            )
        elif a.fine_tune_sweep_ref is not None:
            _resolve_sweep(kube, ns, res, a, spec.runtime, a.fine_tune_sweep_ref.name)
        elif a.fine_tune_job_ref is not None:
            _resolve_job(kube, ns, res, a, spec.runtime, a.fine_tune_job_ref.name)
    return res


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
    res = resolve(kube, adep)
    resolved, adapter_status, failures = res.adapters, res.statuses, res.failures

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
    if res.unservable:
        # The job finished but made something this runtime cannot serve: waiting will not help.
        phase = "Degraded"
        conditions = set_condition(
            conditions, "AdaptersResolved", False, "UnservableAdapter", "; ".join(res.unservable), generation
        )
    elif failures:
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
    if phase == "Ready" and (failures or res.unservable):
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
            if problem:
                summary = f"{problem[0]}: {problem[1]}"
            elif res.unservable:
                summary = f"UnservableAdapter: {'; '.join(res.unservable)}"
            kube.post_event(
                adep,
                phase,
                summary,
                "Warning" if phase == "Degraded" else "Normal",
            )
    # Waiting on a FineTuneJob: its events requeue us, but look again now and then anyway.
    # (A Degraded server needs nothing: its Deployment's and pods' changes are Deployment events.)
    return Result(requeue_after=30.0 if pending else None)
