"""Reading the state of a training attempt from its Job and pods (pure functions)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]

TRAINER_CONTAINER = "trainer"

# Exit codes of `kubetune_trainer` (kubetune_trainer/exit_codes.py) that mean the job can never
# succeed as configured: retrying would only burn GPU hours.
NON_RETRYABLE_EXIT_CODES = {
    2: "InvalidConfig",
    3: "InvalidData",
    4: "UnsupportedHardware",
}


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    pod: str | None = None
    exit_code: int | None = None

    @property
    def retryable(self) -> bool:
        return self.exit_code not in NON_RETRYABLE_EXIT_CODES and self.reason not in (
            "DeadlineExceeded",
            "PodFailurePolicy",  # the Job's FailJob rule: only non-retryable exit codes match it
        )


def job_condition(job: Body | None, type_: str) -> Body | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_succeeded(job: Body | None) -> bool:
    return job_condition(job, "Complete") is not None


def job_failed(job: Body | None) -> bool:
    return job_condition(job, "Failed") is not None


def _terminated(pod: Body) -> Body | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if (
            cs.get("name") == TRAINER_CONTAINER
            or len((pod.get("status") or {}).get("containerStatuses") or []) == 1
        ):
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term
    return None


def _index(pod: Body) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get("batch.kubernetes.io/job-completion-index", "0"))
    except ValueError:
        return 0


def _failed_trainers(pods: list[Body]) -> list[tuple[Body, Body]]:
    """(pod, terminated state) of the pods whose trainer exited non-zero, lowest node rank first."""
    out = []
    for pod in sorted(pods, key=_index):
        term = _terminated(pod) or {}
        if (pod.get("status") or {}).get("phase") == "Failed" and term.get("exitCode") not in (None, 0):
            out.append((pod, term))
    return out


def failure(job: Body, pods: list[Body]) -> Failure:
    """Why the attempt failed: the first failed trainer (lowest node rank), else the Job's own reason."""
    for pod, term in _failed_trainers(pods):
        code = term["exitCode"]
        name = pod["metadata"]["name"]
        known = NON_RETRYABLE_EXIT_CODES.get(code)
        detail = (term.get("message") or "").strip()
        msg = f"pod {name} (node rank {_index(pod)}) exited with code {code}"
        if known:
            msg += f" ({known})"
        if detail:
            msg += f": {detail[:2000]}"
        return Failure(reason=known or "TrainerFailed", message=msg, pod=name, exit_code=code)
    cond = job_condition(job, "Failed") or {}
    reason = cond.get("reason") or "JobFailed"
    message = cond.get("message") or f"the training Job failed ({reason})"
    if reason == "PodFailurePolicy":
        # The Job's podFailurePolicy (builders.job) matched a non-retryable exit code: the Job's
        # message names the pod and the code ("Container trainer for pod ns/x failed with exit
        # code 3 matching FailJob rule at index 0").
        m = _POLICY_MESSAGE.search(message)
        code = int(m.group("code")) if m else None
        known = NON_RETRYABLE_EXIT_CODES.get(code) if code is not None else None
        pod_name = m.group("pod") if m else None
        if known:
            msg = f"pod {pod_name} exited with code {code} ({known}); the Job reports: {message}"
            return Failure(reason=known, message=msg, pod=pod_name, exit_code=code)
        return Failure(reason=reason, message=message, pod=pod_name, exit_code=code)
    return Failure(reason=reason, message=message)


_POLICY_MESSAGE = re.compile(r"for pod [^/\s]+/(?P<pod>\S+) failed with exit code (?P<code>\d+)")


def outcome_visible(job: Body, pods: list[Body]) -> bool:
    """Whether the pods that decide a finished Job's outcome have reached the cache.

    The Job's Complete/Failed and the pods' final states arrive on different watches: a Job can
    be seen finished while its pods still look Running. Deciding then would lose the trainer's
    report (success) or its exit code (a bad config would be retried).
    """
    if job_succeeded(job):
        # The report comes from node rank 0.
        return any(_index(p) == 0 and (_terminated(p) or {}).get("exitCode") == 0 for p in pods)
    if job_failed(job):
        reason = (job_condition(job, "Failed") or {}).get("reason")
        if reason == "DeadlineExceeded":
            return True  # the Job killed its pods: no trainer exit code to wait for
        return bool(_failed_trainers(pods))
    return True


def running_workers(pods: list[Body]) -> int:
    return sum(
        1
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    )


def finished_workers(pods: list[Body]) -> int:
    """Pods whose trainer has exited (the Job may not have counted them yet)."""
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"))


def unschedulable(pods: list[Body]) -> str | None:
    """The scheduler's message for the first pod it could not place, if any."""
    for pod in sorted(pods, key=_index):
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return f"pod {pod['metadata']['name']}: {cond.get('message', 'unschedulable')}"
    return None


def trainer_report(pods: list[Body]) -> dict[str, Any]:
    """The JSON report the trainer writes to its termination message on success (node rank 0)."""
    for pod in sorted(pods, key=_index):
        term = _terminated(pod)
        if not term or term.get("exitCode") != 0 or not term.get("message"):
            continue
        try:
            report = json.loads(term["message"])
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return {}
