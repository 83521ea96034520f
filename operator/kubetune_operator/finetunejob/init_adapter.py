"""``spec.baseModel.initAdapter``: which adapter a FineTuneJob continues.

An ``initAdapter.uri`` is used as given. A ``fineTuneJobRef`` names another FineTuneJob of the
namespace: while that job has not Succeeded this one waits (condition InitAdapterReady False);
once it has, its ``status.output.adapterUri`` is the adapter, recorded in this job's
``status.initAdapterUri`` so every later attempt continues the same adapter. A referenced job
that Failed, has no adapter, or trains another method fails this job with the reason.
Pure functions of the cached FineTuneJobs: the reconcile writes the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import InvalidManifestError, load_finetunejob
from ..api.finetunejob import FineTuneJobStatus
from ..controller import Store
from ..convert import typed

Body = dict[str, Any]
CONDITION = "InitAdapterReady"
# Method types whose adapters are interchangeable (a QLoRA adapter is a LoRA adapter).
_ADAPTER_FAMILY = {
    "lora": "lora",
    "qlora": "lora",
    "prefix": "prefix",
    "prompt": "prompt",
    "ptuning": "ptuning",
}


@dataclass(frozen=True)
class InitAdapter:
    """The outcome: a URI to train from, or why not yet (``waiting``) or never (``failed``)."""

    uri: str | None = None
    waiting: str | None = None
    failed: str | None = None


def init_adapter_refs(ftj: Body) -> list[str]:
    """The FineTuneJob (same namespace) whose adapter this one continues, if any."""
    ref = (((ftj.get("spec") or {}).get("baseModel") or {}).get("initAdapter") or {}).get("fineTuneJobRef")
    return [ref["name"]] if isinstance(ref, dict) and ref.get("name") else []


def resolve(store: Store, ftj: Body) -> InitAdapter:
    job = typed(ftj)
    init = job.spec.base_model.init_adapter
    if init is None:
        return InitAdapter()
    recorded = job.status.init_adapter_uri if job.status is not None else None
    if recorded:
        return InitAdapter(uri=recorded)
    if init.uri:
        return InitAdapter(uri=init.uri)
    ns, own = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
    name = init.fine_tune_job_ref.name if init.fine_tune_job_ref else ""
    if name == own:
        return InitAdapter(
            failed=f"baseModel.initAdapter.fineTuneJobRef names this FineTuneJob ({own}) itself"
        )
    body = store.parents.get((ns, name))
    if body is None:
        return InitAdapter(waiting=f"waiting for FineTuneJob {name}, which does not exist in namespace {ns}")
    try:
        ref = load_finetunejob(body)
    except InvalidManifestError as e:
        return InitAdapter(failed=f"FineTuneJob {name} cannot be read: {e}")
    st = ref.status or FineTuneJobStatus()
    phase = st.phase or "Pending"
    theirs = ref.spec.method.type
    mine = job.spec.method.type
    if _ADAPTER_FAMILY.get(theirs) != _ADAPTER_FAMILY.get(mine):
        return InitAdapter(
            failed=f"FineTuneJob {name} trains a {theirs} adapter and this job's method.type is {mine}: "
            f"set method.type to {theirs} to continue its adapter"
        )
    if phase == "Failed":
        why = next((c.message for c in st.conditions or [] if c.type == "Failed"), "")
        return InitAdapter(
            failed=f"FineTuneJob {name} failed, so it has no adapter to continue: {why or phase}"
        )
    if phase != "Succeeded":
        pct = st.progress.percent if st.progress is not None else None
        done = f", {pct:.0f}% done" if pct is not None else ""
        return InitAdapter(waiting=f"waiting for FineTuneJob {name} to succeed (now {phase}{done})")
    uri = st.output.adapter_uri if st.output is not None else None
    if not uri:
        return InitAdapter(
            failed=f"FineTuneJob {name} succeeded but reports no adapter (status.output.adapterUri is empty); "
            "give baseModel.initAdapter.uri instead"
        )
    return InitAdapter(uri=uri)
