"""FineTuneSweep -> trial FineTuneJobs, and trial FineTuneJobs -> status rows. Pure functions.

A trial is the FineTuneJob `<sweep>-<number>`: the template with the trial's parameters set,
owned by the sweep, labelled with the sweep and the trial number, and annotated with its
parameters (kubetune.io/trial), so the sweep's whole state can be rebuilt from its children.
A pruned trial carries kubetune.io/pruned (the evaluation it was stopped at) and is suspended.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kubetune_trainer.search import space
from kubetune_trainer.settings import Evaluation

from .. import meta
from ..api.finetunejob import FineTuneJobStatus
from ..api.finetunesweep import MAX_EVALUATIONS

Body = dict[str, Any]

LABEL_TRIAL = "kubetune.io/trial"
ANNOTATION_TRIAL = "kubetune.io/trial"
ANNOTATION_PRUNED = "kubetune.io/pruned"


def trial_name(sweep: Body, number: int) -> str:
    return f"{sweep['metadata']['name']}-{number}"


def trial_job(sweep: Body, number: int, params: dict[str, Any]) -> Body:
    """The FineTuneJob of trial `number`: the template with `params` (path -> value) set."""
    spec = sweep["spec"]["template"]
    for path, value in sorted(params.items()):
        spec = space.set_path(spec, path, value)
    labels = meta.child_labels(meta.LABEL_FINETUNESWEEP, sweep["metadata"]["name"], "trial")
    labels[LABEL_TRIAL] = str(number)
    return {
        "apiVersion": meta.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            "name": trial_name(sweep, number),
            "namespace": sweep["metadata"]["namespace"],
            "labels": labels,
            "annotations": {
                ANNOTATION_TRIAL: json.dumps({"number": number, "params": params}, sort_keys=True)
            },
            "ownerReferences": [meta.owner_reference(sweep)],
        },
        "spec": spec,
    }


def prune_patch(step: int, value: float) -> Body:
    """Merge patch stopping a trial: suspended (pods stop, slot freed), marked as pruned."""
    mark = json.dumps({"step": step, "value": value}, sort_keys=True)
    return {"metadata": {"annotations": {ANNOTATION_PRUNED: mark}}, "spec": {"runPolicy": {"suspend": True}}}


def trial_number(job: Body) -> int | None:
    try:
        return int((job["metadata"].get("labels") or {})[LABEL_TRIAL])
    except (KeyError, ValueError):
        return None


def trial_params(job: Body) -> dict[str, Any]:
    raw = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TRIAL)
    try:
        params = json.loads(raw or "{}").get("params")
    except (ValueError, AttributeError):
        return {}
    return params if isinstance(params, dict) else {}


def pruned_mark(job: Body) -> dict[str, Any] | None:
    raw = (job["metadata"].get("annotations") or {}).get(ANNOTATION_PRUNED)
    if not raw:
        return None
    try:
        mark = json.loads(raw)
    except ValueError:
        return {}
    return mark if isinstance(mark, dict) else {}


def show(value: Any) -> str:
    """A parameter value as status shows it: 0.0001 as 1e-04, 16 as 16, cosine as cosine."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)[:64]


def objective_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """The objective in a finished trial's status.metrics (with or without the eval_ prefix)."""
    metrics = metrics or {}
    base = metric.removeprefix("eval_")
    for name in (metric, f"eval_{base}", base):
        v = metrics.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def eval_step(step: int, evaluation: Evaluation) -> int:
    """The step of the evaluation a progress report carries.

    Progress is reported at most every few seconds, so the step it names may be past the
    evaluation that produced its evalLoss; with evaluations every N steps that evaluation was at
    the last multiple of N, which is the same step in every trial (what the pruners compare).
    """
    every = evaluation.every_steps
    if every and evaluation.strategy in ("auto", "steps"):
        return (step // every) * every
    return step


def trial_status(job: Body) -> FineTuneJobStatus:
    """A trial FineTuneJob's status, typed (as the API server validated it)."""
    return FineTuneJobStatus.model_validate(job.get("status") or {}, by_alias=True, by_name=False)


def observe_evaluations(
    old: list[Body] | None, status: FineTuneJobStatus, evaluation: Evaluation
) -> list[Body]:
    """The trial's evaluations so far: those in its status row, plus the one its progress shows
    now if that is new."""
    out = [dict(e) for e in old or []]
    progress = status.progress
    value = progress.eval_loss if progress is not None else None
    step = progress.step if progress is not None else None
    if value is None or step is None or not math.isfinite(value):
        return out
    at = eval_step(step, evaluation)
    if out and (out[-1]["step"] >= at or out[-1]["value"] == value):
        return out
    out.append({"step": at, "value": float(value)})
    return out[-MAX_EVALUATIONS:]


def trial_phase(job: Body, status: FineTuneJobStatus, objective: float | None) -> tuple[str, str]:
    """(trial phase, message) of a trial FineTuneJob (``status``: its typed status)."""
    phase = status.phase or "Pending"
    mark = pruned_mark(job)
    if mark is not None:
        at = f" at step {mark.get('step')} (eval_loss {mark.get('value')})" if mark else ""
        return "Pruned", f"stopped early{at}: worse than the other trials at the same step"
    if phase == "Succeeded":
        if objective is None:
            return "Failed", "finished without the objective metric in status.metrics"
        return "Succeeded", "finished"
    if phase == "Failed":
        why = next((c.message for c in status.conditions or [] if c.type == "Failed"), "")
        return "Failed", (why or "the FineTuneJob failed")[:1024]
    if phase == "Running":
        return "Running", "training"
    return "Pending", f"FineTuneJob {phase}"


TERMINAL = ("Succeeded", "Failed", "Pruned")
