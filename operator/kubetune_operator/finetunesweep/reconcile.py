"""Reconcile one FineTuneSweep: observe its trials, prune, start new ones, report.

Level-based: every pass reads the sweep and its trial FineTuneJobs from the API server (a
consistent read, not the watch cache, so a trial created a moment ago is always seen), rebuilds
the Optuna study from them (finetunesweep.study), and then:

1. asks the pruner about each running trial with a new evaluation; a pruned trial is suspended
   (its pods stop and free their slot; the FineTuneJob, its progress and checkpoints stay);
2. starts trials while fewer than `parallelism` run and fewer than the total were started:
   trial N is created (never applied) as `<sweep>-N`, so a second operator pass, or a restarted
   operator, that asks again gets AlreadyExists instead of a duplicate;
3. writes one status row per trial, the best trial, counts, phase and conditions.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune_trainer.search import space
from kubetune_trainer.settings import Evaluation

from .. import meta, metrics
from ..api.finetunesweep import FineTuneSweepSpec
from ..api.manifest import InvalidManifestError, load_model
from ..conditions import get_condition, set_condition
from ..controller import Key, Result, Store
from ..kube import Kube
from . import builders, study

log = logging.getLogger(__name__)

Body = dict[str, Any]
KIND = "FineTuneSweep"


def trials_of(kube: Kube, sweep: Body) -> list[Body]:
    """The sweep's trial FineTuneJobs (by label, and owned by this very sweep: not a namesake's)."""
    ns, name, uid = sweep["metadata"]["namespace"], sweep["metadata"]["name"], sweep["metadata"]["uid"]
    jobs = kube.list(meta.API_VERSION, "FineTuneJob", ns, f"{meta.LABEL_FINETUNESWEEP}={name}")
    return [
        j
        for j in jobs
        if any(o.get("uid") == uid for o in j["metadata"].get("ownerReferences") or [])
        and builders.trial_number(j) is not None
    ]


def reconcile(kube: Kube, store: Store, key: Key) -> Result:
    # Read fresh, not from the watch cache: the status rows hold the evaluations seen so far, and
    # a cached copy that lags our own last status write would drop the newest of them.
    sweep = kube.get(meta.API_VERSION, KIND, key[0], key[1])
    if sweep is None:
        return Result()
    if sweep["metadata"].get("deletionTimestamp"):
        return Result()  # going away (its trials with it): start nothing
    status: Body = dict(sweep.get("status") or {})
    generation = sweep["metadata"].get("generation")
    conditions = status.get("conditions") or []
    # The spec as the API server validated it, read by typed fields (defaults filled in). A sweep
    # stored before a rule it breaks existed fails once, saying which field, instead of raising
    # on every pass; its trials keep running to their own end.
    try:
        spec = load_model(FineTuneSweepSpec, sweep["spec"], strict=False)
    except InvalidManifestError as e:
        fields = "; ".join(f"spec.{path}: {msg}" if path else msg for path, msg in e.errors)
        message = (
            f"the stored spec breaks a rule added since it was created ({fields}); fix it and apply it again"
        )
        return _fail(kube, sweep, status, conditions, "InvalidSpec", message)
    metric, direction = spec.objective.metric, spec.objective.direction

    try:
        params = study.parameters(spec)
    except space.SearchSpaceError as e:
        return _fail(kube, sweep, status, conditions, "InvalidSearchSpace", f"{e}; fix spec.parameters")
    total = study.total_trials(spec, params)

    jobs = sorted(trials_of(kube, sweep), key=lambda j: builders.trial_number(j) or 0)
    old_rows = {r["name"]: r for r in status.get("trials") or []}
    rows: list[Body] = []
    records: list[study.Record] = []
    observed: list[tuple[Body, study.Record, Body]] = []
    for job in jobs:
        old_row = old_rows.pop(job["metadata"]["name"], None)
        row, record = _observe(job, old_row, spec.template.evaluation, metric)
        rows.append(row)
        records.append(record)
        observed.append((row, record, job))
    # A trial whose FineTuneJob was deleted keeps its row (and its number: it is not run again).
    for gone in old_rows.values():
        if gone.get("phase") not in builders.TERMINAL:
            gone = {**gone, "phase": "Failed", "message": "its FineTuneJob was deleted"}
        rows.append(gone)
    rows.sort(key=lambda r: int(r.get("number", 0)))
    next_number = max((int(r.get("number", 0)) for r in rows), default=-1) + 1

    # 1. Prune running trials that fell behind (only those with an evaluation not yet judged).
    if spec.early_stopping and any(r.phase == "Running" and r.evaluations for r in records):
        search = study.rebuild(spec, params, records, next_number)
        for row, record, job in observed:
            if record.phase != "Running" or not record.evaluations:
                continue
            prune, rungs = study.should_prune(search, record.number)
            record.rungs = row["rungs"] = rungs or row.get("rungs") or {}
            if not row["rungs"]:
                row.pop("rungs")
            if prune:
                step, value = record.evaluations[-1]
                kube.merge_patch(meta.API_VERSION, "FineTuneJob", key[0], job["metadata"]["name"],
                                 builders.prune_patch(step, value))  # fmt: skip
                record.phase = row["phase"] = "Pruned"
                row["message"] = (
                    f"stopped early at step {step} (eval_loss {value:.4g}): worse than the other trials"
                )
                metrics.SWEEP_TRIALS.labels("pruned").inc()
                kube.post_event(sweep, "TrialPruned", f"trial {row['name']}: {row['message']}")

    # 2. Start trials while there is room.
    active = sum(1 for r in records if r.phase not in builders.TERMINAL)
    requeue: float | None = None
    while active < spec.parallelism and next_number < total:
        search = study.rebuild(spec, params, records, next_number)
        trial_params = study.ask(search)
        child = builders.trial_job(sweep, next_number, trial_params)
        try:
            kube.create(child)
        except ApiException as e:
            if e.status == 409:  # already there: an earlier pass made it; look again with it listed
                requeue = 0.5
                break
            if e.status == 404 or (e.status == 403 and "NamespaceTerminating" in (e.body or "")):
                return Result()  # the namespace is going away, and the sweep with it
            if e.status in (400, 422):
                # A combination the FineTuneJob's own rules refuse: the sweep cannot go on as it is.
                msg = f"the API server rejected trial {child['metadata']['name']}: {_reason(e)}"
                if (get_condition(conditions, "Failed") or {}).get("message") != msg:
                    kube.post_event(sweep, "TrialRejected", msg, "Warning")
                return _fail(kube, sweep, status, conditions, "TrialRejected", msg)
            raise
        metrics.SWEEP_TRIALS.labels("created").inc()
        desc = ", ".join(f"{k}={builders.show(v)}" for k, v in sorted(trial_params.items()))
        kube.post_event(sweep, "TrialCreated", f"trial {child['metadata']['name']}: {desc}")
        records.append(study.Record(next_number, trial_params, "Pending"))
        rows.append(
            {
                "name": child["metadata"]["name"],
                "number": next_number,
                "parameters": {k: builders.show(v) for k, v in trial_params.items()},
                "phase": "Pending",
                "message": "created",
            }
        )
        next_number += 1
        active += 1

    # 3. Report.
    counts = {p: sum(1 for r in rows if r["phase"] == p) for p in ("Succeeded", "Pruned", "Failed")}
    running = sum(1 for r in rows if r["phase"] not in builders.TERMINAL)
    finished = sum(counts.values())
    best = space.best_of(
        [r for r in rows if r["phase"] == "Succeeded" and r.get("objective") is not None], direction
    )
    new: Body = {
        "observedGeneration": generation,
        "trials": rows,
        "totalTrials": total,
        "created": len(rows),
        "running": running,
        "succeeded": counts["Succeeded"],
        "pruned": counts["Pruned"],
        "failed": counts["Failed"],
        "completed": f"{finished}/{total}",
    }
    if best is not None:
        new["bestTrial"] = {
            k: v
            for k, v in {
                "name": best["name"],
                "parameters": best["parameters"],
                "objective": best["objective"],
                "adapterUri": best.get("adapterUri"),
            }.items()
            if v is not None
        }
    done = next_number >= total and running == 0
    if done and best is not None:
        phase = "Succeeded"
        msg = f"{finished} trial(s) finished; best {best['name']} with {metric} {best['objective']:.6g}"
        conditions = set_condition(conditions, "Running", False, "Completed", msg, generation)
        conditions = set_condition(conditions, "Succeeded", True, "Completed", msg, generation)
    elif done:
        phase = "Failed"
        msg = f"no trial of {finished} finished with {metric} in its metrics; see status.trials[].message"
        conditions = set_condition(conditions, "Running", False, "NoTrialSucceeded", msg, generation)
        conditions = set_condition(conditions, "Failed", True, "NoTrialSucceeded", msg, generation)
    else:
        phase = "Running" if rows else "Pending"
        best_msg = f"; best so far {best['name']} ({metric} {best['objective']:.6g})" if best else ""
        conditions = set_condition(
            conditions,
            "Running",
            bool(rows),
            "TrialsRunning" if rows else "Starting",
            f"{running} running, {finished} of {total} finished{best_msg}",
            generation,
        )
        for stale in ("Succeeded", "Failed"):
            if get_condition(conditions, stale):
                conditions = set_condition(
                    conditions, stale, False, "Running", "trials are running again", generation
                )
    new["phase"] = phase
    new["conditions"] = conditions
    _write(kube, sweep, status, new)
    return Result(requeue_after=requeue)


def _observe(
    job: Body, old_row: Body | None, evaluation: Evaluation, metric: str
) -> tuple[Body, study.Record]:
    number = builders.trial_number(job) or 0
    st = builders.trial_status(job)
    params = builders.trial_params(job)
    evaluations = builders.observe_evaluations((old_row or {}).get("evaluations"), st, evaluation)
    final = builders.objective_value(st.metrics, metric)
    phase, message = builders.trial_phase(job, st, final)
    objective = final if phase == "Succeeded" else (evaluations[-1]["value"] if evaluations else None)
    row: Body = {
        "name": job["metadata"]["name"],
        "number": number,
        "parameters": {k: builders.show(v) for k, v in params.items()},
        "phase": phase,
        "message": message,
    }
    if st.phase:
        row["jobPhase"] = st.phase
    if objective is not None:
        row["objective"] = objective
    step = st.progress.step if st.progress is not None else None
    if step is not None:
        row["step"] = step
    if evaluations:
        row["evaluations"] = evaluations
    rungs = (old_row or {}).get("rungs")
    if rungs:
        row["rungs"] = rungs
    uri = st.output.adapter_uri if st.output is not None else None
    if phase == "Succeeded" and uri:
        row["adapterUri"] = uri
    record = study.Record(
        number=number,
        params=params,
        phase=phase,
        objective=final,
        evaluations=[(int(e["step"]), float(e["value"])) for e in evaluations],
        rungs=dict(rungs or {}),
    )
    return row, record


def _reason(e: ApiException) -> str:
    import json

    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)[:800]
    except ValueError:
        return str(e.reason)


def _fail(kube: Kube, sweep: Body, status: Body, conditions: list[Body], reason: str, message: str) -> Result:
    """The sweep cannot go on as it is: phase Failed with a condition that says why."""
    generation = sweep["metadata"].get("generation")
    conditions = set_condition(conditions, "Failed", True, reason, message, generation)
    _write(
        kube, sweep, status, {"observedGeneration": generation, "phase": "Failed", "conditions": conditions}
    )
    return Result()


def _write(kube: Kube, sweep: Body, old: Body, new: Body) -> None:
    """Patch what changed; an Event when the phase changes."""
    ns, name = sweep["metadata"]["namespace"], sweep["metadata"]["name"]
    metrics.FINETUNESWEEPS_PHASE.set(ns, name, new.get("phase") or old.get("phase") or "Pending")
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    if not changed:
        return
    kube.patch_status(sweep["apiVersion"], KIND, ns, name, changed)
    if "phase" in changed and changed["phase"] != old.get("phase"):
        cond = get_condition(new.get("conditions"), changed["phase"]) or get_condition(
            new.get("conditions"), "Running"
        )
        kind = "Warning" if changed["phase"] == "Failed" else "Normal"
        kube.post_event(sweep, changed["phase"], (cond or {}).get("message") or changed["phase"], kind)
        log.info("FineTuneSweep %s/%s: %s -> %s", ns, name, old.get("phase"), changed["phase"])
