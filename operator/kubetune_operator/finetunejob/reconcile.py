"""Reconcile one FineTuneJob: converge its children and report its state in status.

Level-based: everything is derived from the FineTuneJob (spec and the status it already has)
and the Jobs/pods observed on the watches. Running it twice in a row changes nothing.

Attempts: attempt N runs as Job `<name>-<N>`. When it fails with a retryable exit code and
restarts remain, status.attempt becomes N+1 first; the next pass creates Job N+1, whose
trainer resumes from the newest complete checkpoint in S3. Old attempts' Jobs are kept (their
pods hold no resources once finished, and their logs explain the restart).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydantic import ValidationError

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError

from .. import meta, metrics
from ..api import InvalidManifestError
from ..api.finetunejob import RunPolicy
from ..conditions import get_condition, now_iso, set_condition
from ..controller import Key, Result, Store, slim
from ..convert import to_config_dict, typed
from ..kube import Kube
from ..settings import Settings, load
from . import builders, init_adapter, observe

log = logging.getLogger(__name__)

Body = dict[str, Any]
KIND = "FineTuneJob"
TERMINAL = ("Succeeded", "Failed")

_settings: Settings | None = None

# A finished Job whose deciding pods are not in the cache yet (they come on another watch) is
# looked at again every SETTLE_REQUEUE seconds; SETTLE_SECONDS after the Job finished (its
# Complete/Failed condition's lastTransitionTime) its pods are read from the API server once,
# and then the outcome is decided with what there is.
SETTLE_REQUEUE = 0.5
SETTLE_SECONDS = 5.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load()
    return _settings


def _parse_time(ts: str | None) -> dt.datetime | None:
    if not ts:
        return None
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _attempt_of(job: Body) -> int:
    try:
        return int(job["metadata"]["labels"][meta.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return 0


def reconcile(kube: Kube, store: Store, key: Key) -> Result:
    ftj = store.parents[key]
    status: Body = dict(ftj.get("status") or {})
    generation = ftj["metadata"].get("generation")
    phase = status.get("phase")
    conditions = status.get("conditions") or []
    try:
        spec = typed(ftj).spec
    except InvalidManifestError as e:  # stored before a rule it breaks existed: never start pods for it
        new: Body = {"observedGeneration": generation}
        ttl = _stored_ttl(ftj)  # ttlSecondsAfterFinished still applies when its own block is valid
        if phase in TERMINAL:
            result = _expire(kube, ftj, status, ttl)
        else:
            new.update(phase="Failed", completionTime=now_iso())
            new["conditions"] = set_condition(conditions, "Failed", True, "InvalidSpec", str(e), generation)
            result = _after_finish(ttl)
        _write(kube, ftj, status, new)
        return result
    run_policy = spec.run_policy
    res = spec.resources
    jobs = store.children_of("Job", key)
    pods = store.children_of("Pod", key)
    nodes = res.nodes
    new = {"observedGeneration": generation, "workers": f"{nodes}x{res.gpus_per_node}"}
    result = Result()

    if phase in TERMINAL:
        result = _expire(kube, ftj, status, run_policy.ttl_seconds_after_finished)
        _write(kube, ftj, status, new)
        return result

    attempt = max([int(status.get("attempt") or 1), *(_attempt_of(j) for j in jobs)])
    job_name = builders.names(ftj).job(attempt)
    current = next((j for j in jobs if j["metadata"]["name"] == job_name), None)
    attempt_pods = [
        p for p in pods if (p["metadata"].get("labels") or {}).get(meta.LABEL_ATTEMPT) == str(attempt)
    ]
    new["attempt"] = attempt

    deadline = run_policy.active_deadline_seconds
    start = _parse_time(status.get("startTime"))
    remaining = None
    if deadline and start:
        remaining = int(deadline - (dt.datetime.now(dt.UTC) - start).total_seconds())
        if remaining <= 0 and not observe.job_succeeded(current):
            new.update(phase="Failed", completionTime=now_iso())
            conditions = set_condition(
                conditions,
                "Failed",
                True,
                "DeadlineExceeded",
                f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline}s)",
                generation,
            )
            conditions = set_condition(
                conditions, "Running", False, "DeadlineExceeded", "stopped", generation
            )
            if current is not None:
                kube.delete("batch/v1", "Job", key[0], current["metadata"]["name"])
            new["conditions"] = conditions
            _write(kube, ftj, status, new)
            return _after_finish(run_policy.ttl_seconds_after_finished)

    if current is None:
        init = init_adapter.resolve(store, ftj)
        if init.failed:
            new.update(phase="Failed", completionTime=now_iso())
            conditions = set_condition(
                conditions, init_adapter.CONDITION, False, "InitAdapterUnavailable", init.failed, generation
            )
            new["conditions"] = set_condition(
                conditions, "Failed", True, "InitAdapterUnavailable", init.failed, generation
            )
            _write(kube, ftj, status, new)
            return _after_finish(run_policy.ttl_seconds_after_finished)
        if init.waiting:
            # Requeued when the referenced FineTuneJob changes (Store.refs) and on every resync.
            new["phase"] = "Pending"
            new["conditions"] = set_condition(
                conditions, init_adapter.CONDITION, False, "WaitingForFineTuneJob", init.waiting, generation
            )
            _write(kube, ftj, status, new)
            return Result()
        if init.uri:
            new["initAdapterUri"] = init.uri
            conditions = set_condition(
                conditions,
                init_adapter.CONDITION,
                True,
                "Resolved",
                f"training continues the adapter {init.uri}",
                generation,
            )
        try:
            trainer_config = to_config_dict(ftj, init_adapter=init.uri)
            FinetuningConfig.from_dict(trainer_config, source="spec")
        except (ConfigError, ValueError) as e:
            # The API server's validation should have caught this; never start pods that cannot work.
            new.update(phase="Failed", completionTime=now_iso())
            new["conditions"] = set_condition(conditions, "Failed", True, "InvalidConfig", str(e), generation)
            _write(kube, ftj, status, new)
            return _after_finish(run_policy.ttl_seconds_after_finished)
        current = _create_attempt(kube, ftj, attempt, remaining, trainer_config)
        conditions = set_condition(
            conditions,
            "Created",
            True,
            "JobCreated",
            f"attempt {attempt}: Job {job_name} created",
            generation,
        )
    elif (init := init_adapter.resolve(store, ftj)).uri:
        # The Job exists only for a resolved adapter. A status written from a stale cache can still
        # carry the waiting condition: level-based, say what is true now.
        new["initAdapterUri"] = init.uri
        conditions = set_condition(
            conditions,
            init_adapter.CONDITION,
            True,
            "Resolved",
            f"training continues the adapter {init.uri}",
            generation,
        )

    # Converge what can change on a live Job: suspension (runPolicy.suspend).
    want_suspend = run_policy.suspend
    job_suspended = bool((current.get("spec") or {}).get("suspend"))
    if want_suspend and not job_suspended:
        kube.merge_patch("batch/v1", "Job", key[0], job_name, {"spec": {"suspend": True}})
        job_suspended = True
    elif not want_suspend and job_suspended and not run_policy.queue_name:
        kube.merge_patch("batch/v1", "Job", key[0], job_name, {"spec": {"suspend": False}})
        job_suspended = False

    if observe.job_succeeded(current) or observe.job_failed(current):
        settled = _settled_pods(kube, current, attempt_pods)
        if settled is None:
            new["conditions"] = conditions
            _write(kube, ftj, status, new)
            return Result(requeue_after=SETTLE_REQUEUE)
        attempt_pods = settled

    if observe.job_succeeded(current):
        report = observe.trainer_report(attempt_pods)
        output = {"adapterUri": report.get("adapterUri") or final_uri(ftj)}
        for k in ("mergedUri", "method", "rank", "trainableParameters", "totalParameters", "augmentation"):
            if report.get(k) is not None:
                output[k] = report[k]
        new.update(phase="Succeeded", completionTime=now_iso(), output=output)
        if isinstance(report.get("metrics"), dict):
            new["metrics"] = report["metrics"]
        conditions = set_condition(conditions, "Running", False, "Completed", "training finished", generation)
        conditions = set_condition(
            conditions,
            "Succeeded",
            True,
            "Completed",
            f"adapter written to {output['adapterUri']}",
            generation,
        )
        result = _after_finish(run_policy.ttl_seconds_after_finished)
    elif observe.job_failed(current):
        failure = observe.failure(current, attempt_pods)
        max_restarts = run_policy.max_restarts
        if failure.retryable and attempt <= max_restarts:
            new["attempt"] = attempt + 1
            new["phase"] = "Pending"
            conditions = set_condition(
                conditions,
                "Running",
                False,
                "Restarting",
                f"attempt {attempt} failed: {failure.message}; starting attempt {attempt + 1} of {max_restarts + 1}, "
                "which resumes from the latest checkpoint",
                generation,
            )
            kube.post_event(
                ftj,
                "Restarting",
                f"attempt {attempt} failed ({failure.reason}); starting attempt {attempt + 1}",
                "Warning",
            )
            result = Result(requeue_after=0.1)
        else:
            why = (
                "not retried: the failure is in the job's configuration or data"
                if not failure.retryable
                else (f"no restarts left (runPolicy.maxRestarts={max_restarts})")
            )
            new.update(phase="Failed", completionTime=now_iso())
            conditions = set_condition(
                conditions, "Running", False, failure.reason, failure.message, generation
            )
            conditions = set_condition(
                conditions, "Failed", True, failure.reason, f"{failure.message} ({why})", generation
            )
            result = _after_finish(run_policy.ttl_seconds_after_finished)
    elif job_suspended:
        queued = bool(run_policy.queue_name) and not want_suspend
        new["phase"] = "Queued" if queued else "Suspended"
        reason = "WaitingForAdmission" if queued else "Suspended"
        msg = (
            f"waiting for Kueue to admit the Job to queue {run_policy.queue_name}"
            if queued
            else "suspended by runPolicy.suspend; set it to false to resume from the latest checkpoint"
        )
        conditions = set_condition(conditions, "Suspended", True, reason, msg, generation)
        conditions = set_condition(conditions, "Running", False, reason, msg, generation)
    else:
        running = observe.running_workers(attempt_pods)
        if get_condition(conditions, "Suspended"):
            conditions = set_condition(conditions, "Suspended", False, "Resumed", "running again", generation)
        unsched = observe.unschedulable(attempt_pods)
        if unsched:
            conditions = set_condition(
                conditions, "PodsScheduled", False, "Unschedulable", unsched, generation
            )
        elif attempt_pods and all((p.get("spec") or {}).get("nodeName") for p in attempt_pods):
            conditions = set_condition(
                conditions,
                "PodsScheduled",
                True,
                "Scheduled",
                f"{len(attempt_pods)} of {nodes} pods scheduled",
                generation,
            )
        # Workers that already exited count as started: between a trainer's exit and the Job's
        # Complete/Failed the job is finishing, not back to Pending.
        finished = observe.finished_workers(attempt_pods)
        if running >= nodes or (finished and running + finished >= nodes):
            new["phase"] = "Running"
            if not status.get("startTime"):
                new["startTime"] = now_iso()
            done = f", {finished} finished" if finished else ""
            conditions = set_condition(
                conditions,
                "Running",
                True,
                "AllWorkersRunning",
                f"{running} of {nodes} workers running{done} (attempt {attempt})",
                generation,
            )
        else:
            new["phase"] = "Pending"
            conditions = set_condition(
                conditions,
                "Running",
                False,
                "WaitingForWorkers",
                f"{running} of {nodes} workers running",
                generation,
            )
        if deadline and remaining is not None:
            result = Result(requeue_after=float(max(1, remaining)))
    new["conditions"] = conditions
    _write(kube, ftj, status, new)
    return result


def _settled_pods(kube: Kube, job: Body, pods: list[Body]) -> list[Body] | None:
    """The pods to decide a finished Job's outcome from, or None: look again shortly.

    Bounded: after SETTLE_SECONDS the Job's pods are listed from the API server (by the Job's
    controller-uid label); whatever that shows, the outcome is then decided.
    """
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    uid = job["metadata"].get("uid") or f"{ns}/{name}"
    if observe.outcome_visible(job, pods):
        return pods
    finished = observe.job_condition(job, "Complete" if observe.job_succeeded(job) else "Failed") or {}
    since = _parse_time(finished.get("lastTransitionTime"))
    # Without a transition time (or with a clock behind the API server's) the wait is bounded by
    # the live read below, which never waits.
    if since is not None and 0 <= (_utcnow() - since).total_seconds() < SETTLE_SECONDS:
        return None
    selector = f"batch.kubernetes.io/controller-uid={uid}"
    try:
        live = [slim("Pod", p) for p in kube.list("v1", "Pod", ns, selector)]
    except Exception as e:  # the Job's own record is still there to decide from
        log.warning("could not list the pods of Job %s/%s: %s", ns, name, e)
        return pods
    log.info(
        "Job %s/%s finished but its pods were not on the watch after %.0fs; read %d from the API server",
        ns,
        name,
        SETTLE_SECONDS,
        len(live),
    )
    return live if observe.outcome_visible(job, live) else pods or live


def final_uri(ftj: Body) -> str | None:
    """Where the trainer writes the final adapter (DESIGN "S3 layout")."""
    cfg = FinetuningConfig.from_dict(to_config_dict(ftj), source="spec")
    root = cfg.storage_root()
    return f"{root}final/" if root else None


def _create_attempt(kube: Kube, ftj: Body, attempt: int, remaining: int | None, trainer_config: Body) -> Body:
    """The per-job RBAC, config and Service first (the pods need them), then the Job."""
    s = settings()
    kube.apply(builders.service_account(ftj))
    kube.apply(builders.role(ftj))
    kube.apply(builders.role_binding(ftj))
    kube.apply(builders.config_map(ftj, trainer_config))
    kube.apply(builders.headless_service(ftj, s))
    return kube.apply(builders.job(ftj, attempt, s, active_deadline_seconds=remaining))


def _stored_ttl(ftj: Body) -> int | None:
    """runPolicy.ttlSecondsAfterFinished of a spec that fails validation elsewhere (None when the
    runPolicy block itself is invalid): the typed block, read on its own."""
    try:
        block = RunPolicy.model_validate((ftj.get("spec") or {}).get("runPolicy") or {}, by_alias=True)
    except ValidationError:
        return None
    return block.ttl_seconds_after_finished


def _after_finish(ttl: int | None) -> Result:
    """The requeue for a job that has just finished: look again when its ttlSecondsAfterFinished is up."""
    return Result(requeue_after=float(ttl) + 1) if ttl is not None else Result()


def _expire(kube: Kube, ftj: Body, status: Body, ttl: int | None) -> Result:
    """ttlSecondsAfterFinished: delete the finished FineTuneJob (its children go with it)."""
    done = _parse_time(status.get("completionTime"))
    if ttl is None or done is None:
        return Result()
    left = ttl - (dt.datetime.now(dt.UTC) - done).total_seconds()
    if left > 0:
        return Result(requeue_after=left + 0.5)
    kube.delete(ftj["apiVersion"], KIND, ftj["metadata"]["namespace"], ftj["metadata"]["name"])
    return Result()


def _write(kube: Kube, ftj: Body, old: Body, new: Body) -> None:
    """Patch only what changed; post an Event when the phase changes."""
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    phase = new.get("phase") or old.get("phase") or "Pending"
    metrics.FINETUNEJOBS_PHASE.set(ftj["metadata"]["namespace"], ftj["metadata"]["name"], phase)
    if not changed:
        return
    if "phase" not in new and "phase" not in old:
        changed["phase"] = phase
    kube.patch_status(ftj["apiVersion"], KIND, ftj["metadata"]["namespace"], ftj["metadata"]["name"], changed)
    if "phase" in changed and changed["phase"] != old.get("phase"):
        msg = _phase_message(changed["phase"], new)
        kind = "Warning" if changed["phase"] == "Failed" else "Normal"
        kube.post_event(ftj, changed["phase"], msg, kind)
        log.info(
            "FineTuneJob %s/%s: %s -> %s",
            ftj["metadata"]["namespace"],
            ftj["metadata"]["name"],
            old.get("phase"),
            changed["phase"],
        )


def _phase_message(phase: str, new: Body) -> str:
    for cond in reversed(new.get("conditions") or []):
        if cond.get("status") == "True" and cond.get("type") in (
            "Failed",
            "Succeeded",
            "Running",
            "Suspended",
            "Created",
        ):
            return cond.get("message") or phase
    return phase
