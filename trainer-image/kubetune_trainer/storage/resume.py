"""Resuming a run: which local checkpoint is complete, which one to resume from, and the best
checkpoint made usable again in a new pod.

A pod resumes from the newest checkpoint with a manifest in S3 (``CheckpointStore``); without
``storage_uri``, from the newest COMPLETE ``checkpoint-<step>`` folder on local disk.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kubetune_trainer.distributed import DistInfo, local_main_first

from .checkpoints import TRAINER_STATE_NAME, CheckpointStore, best_step_from_state, checkpoint_step
from .errors import StorageError

log = logging.getLogger(__name__)


def resume_checkpoint(
    store: CheckpointStore | None, local_root: Path, dist: DistInfo, deepspeed: bool = False
) -> str | None:
    """The checkpoint to resume from: the newest complete one in storage, else a local one.

    With a ``store``, local rank 0 of every node downloads it into ``local_root`` (and the best
    checkpoint it records, see :func:`restore_best_checkpoint`); the other ranks read its step
    from a marker file once it is there.
    """
    if store is not None:
        step = None
        with local_main_first(dist):
            marker = local_root / ".restored"
            if dist.is_local_rank0:
                restored = store.restore_latest(local_root)
                step = restored[0] if restored else None
                if restored:
                    # load_best_model_at_end needs the best checkpoint here too, under a local path.
                    restore_best_checkpoint(store, local_root, restored[1], deepspeed)
                if dist.is_global_rank0:
                    # Half-uploaded checkpoints of a killed attempt: this attempt will redo them.
                    store.discard_incomplete(after_step=step)
                local_root.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"step": step}))
            else:
                step = json.loads(marker.read_text())["step"]
        if step is not None:
            path = local_root / f"checkpoint-{step}"
            log.info("resuming from checkpoint %s (step %d)", path, step)
            return str(path)
        return None
    last = last_complete_checkpoint(local_root, deepspeed=deepspeed)
    if last:
        log.info("resuming from local checkpoint %s (set resume: never to start over)", last)
    return last


def local_checkpoint_problem(path: Path, deepspeed: bool) -> str | None:
    """Why the local Trainer checkpoint ``path`` is not complete, or None when it is.

    Trainer writes a checkpoint folder in place: weights, optimizer and scheduler (under
    DeepSpeed: ``global_step<N>/`` and then the ``latest`` file), RNG states, and
    ``trainer_state.json`` LAST. A process killed in between leaves a folder that looks like a
    checkpoint, so "complete" means: ``trainer_state.json`` parses as JSON and, with DeepSpeed,
    ``latest`` names a ``global_step*`` folder that exists.
    """
    state = path / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME} (the save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE_NAME} is unreadable ({exc})"
    if deepspeed:
        latest = path / "latest"
        if not latest.is_file():
            return "no DeepSpeed 'latest' file (the DeepSpeed save was interrupted)"
        tag = latest.read_text(encoding="utf-8").strip()
        if not tag or not (path / tag).is_dir():
            return f"DeepSpeed 'latest' names {tag!r}, which is not a folder of the checkpoint"
    return None


def last_complete_checkpoint(folder: str | os.PathLike[str], deepspeed: bool = False) -> str | None:
    """The newest ``checkpoint-<step>`` folder under ``folder`` that is complete, or None.

    Unlike transformers' ``get_last_checkpoint`` (the newest folder, whatever it holds), this
    skips folders a ``kill -9`` left half-written (see :func:`local_checkpoint_problem`).
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        step = checkpoint_step(child.name)
        if step is not None and child.is_dir():
            steps.append((step, child))
    for _, path in sorted(steps, reverse=True):
        problem = local_checkpoint_problem(path, deepspeed)
        if problem is None:
            return str(path)
        log.warning("skipping incomplete local checkpoint %s: %s", path, problem)
    return None


def restore_best_checkpoint(
    store: CheckpointStore, local_root: Path, resumed: Path, deepspeed: bool = False
) -> Path | None:
    """Make the best checkpoint recorded in ``resumed`` usable in this pod; returns its local path.

    ``trainer_state.json`` names the best checkpoint (what ``load_best_model_at_end`` reloads)
    by an absolute path on the machine that wrote it. Download that checkpoint from ``store``
    when it is not ``resumed`` itself and not already complete under ``local_root``, then rewrite
    ``best_model_checkpoint`` in ``resumed``'s state to the local folder (None when it cannot be
    restored: then the run keeps the best of the evaluations still to come, with a warning).
    """
    state_path = resumed / TRAINER_STATE_NAME
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # Trainer reports an unusable state itself
    best = best_step_from_state(state)
    if best is None:
        return None
    candidate = local_root / f"checkpoint-{best}"
    best_dir: Path | None = candidate
    if (
        candidate.resolve() != resumed.resolve()
        and local_checkpoint_problem(candidate, deepspeed) is not None
    ):
        try:
            best_dir = store.download(best, local_root)
            log.info("restored the best checkpoint (step %d) to %s", best, best_dir)
        except StorageError as exc:
            log.warning(
                "the best checkpoint (step %d, metric %s) could not be restored (%s): the output will be "
                "the best of the evaluations from here on",
                best,
                state.get("best_metric"),
                exc,
            )
            best_dir = None
    local = str(best_dir) if best_dir is not None else None
    if state.get("best_model_checkpoint") != local:
        state["best_model_checkpoint"] = local
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, state_path)
    return best_dir
