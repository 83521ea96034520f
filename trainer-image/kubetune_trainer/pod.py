"""The trainer's answer to the operator: the container's termination message.

Kubernetes copies the file at the container's ``terminationMessagePath`` into the pod status,
where the operator reads it (``observe.trainer_report`` / ``observe.failure``) without S3 access:

- success: global rank 0 writes a JSON report (:func:`report`) with the keys the operator copies
  into ``status.output`` and ``status.metrics``;
- failure: any rank writes its error (:func:`write_error`). The first message written wins: when
  one worker fails, torchrun SIGTERMs the others, and their "stopped by SIGTERM" must not hide
  the root cause.

The path is ``$KUBETUNE_TERMINATION_MESSAGE_PATH``, else /dev/termination-log when it exists and is
writable (the operator's pods); elsewhere nothing is written. s3:// data and models are fetched by
the finetuner itself (``data.materialise.local_source`` / ``models.download_model``), so a pod and
``kubetune run --local`` read the same inputs the same way.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # job imports the finetuner; this module must stay cheap for the CLI's error path
    from kubetune_trainer.job import TrainingResult

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096  # what the kubelet keeps of a termination message
MAX_METRICS = 128  # status.metrics' maxProperties in the FineTuneJob CRD
DEFAULT_PATH = Path("/dev/termination-log")


def termination_path() -> Path | None:
    explicit = os.environ.get("KUBETUNE_TERMINATION_MESSAGE_PATH")
    if explicit:
        return Path(explicit)
    return DEFAULT_PATH if DEFAULT_PATH.exists() and os.access(DEFAULT_PATH, os.W_OK) else None


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def scalar_metrics(*groups: dict[str, Any]) -> dict[str, float]:
    """Finite numbers only (status.metrics is {name: number}; JSON has no NaN), without bookkeeping."""
    out: dict[str, float] = {}
    for group in groups:
        for name, value in group.items():
            if name == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value) and len(out) < MAX_METRICS:
                out[name] = float(value)
    return out


def report(result: TrainingResult) -> dict[str, Any]:
    """The success report: ``adapterUri``, ``mergedUri``, ``method``, ``rank``, parameter counts, final
    metrics, augmentation counts.

    URIs are present only when the output was uploaded (``storage_uri`` set); without them the
    operator falls back to the deterministic S3 layout.
    """
    doc: dict[str, Any] = {
        "adapterUri": result.adapter_uri,
        "mergedUri": result.merged_uri,
        "trainableParameters": result.trainable_parameters,
        "totalParameters": result.total_parameters,
        "metrics": scalar_metrics(result.eval_metrics, result.test_metrics),
        "augmentation": result.augmentation or None,  # {method: {generated, kept, dropped}}
        **result.saved,  # method, rank: what the saved output is (artifacts.saved_output)
    }
    return {k: v for k, v in doc.items() if v is not None}


def write_report(doc: dict[str, Any]) -> Path | None:
    """Global rank 0 only: write the success report; returns where it went (None: not written)."""
    path = termination_path()
    if path is None or not _is_rank0():
        return None
    text = json.dumps(doc, separators=(",", ":"))
    if len(text) > MAX_MESSAGE:  # the URIs and counts matter more than a long metrics list
        text = json.dumps({k: v for k, v in doc.items() if k != "metrics"}, separators=(",", ":"))
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:  # the adapter is uploaded; the operator falls back to the S3 layout
        log.warning("could not write the termination report to %s: %s", path, e)
        return None
    return path


def error_message(exc: BaseException, expected: bool) -> str:
    """One line for the operator: the user-facing message; unexpected errors also name their type."""
    text = str(exc).strip()
    if expected and text:  # config, data and hardware errors already say what and how to fix
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_error(message: str) -> Path | None:
    """Any rank: why this process failed, unless another rank already wrote its error first."""
    path = termination_path()
    if path is None:
        return None
    try:
        with path.open("a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # ranks of one pod share the file
            if f.tell() > 0:
                return None  # first error wins (see module docstring)
            f.write(message[-MAX_MESSAGE:])
    except OSError as e:  # never hide the real error behind this one
        log.warning("could not write the termination message to %s: %s", path, e)
        return None
    return path
