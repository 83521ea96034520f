"""Checkpoints in S3 with a manifest written last.

Layout under the job root ``s3://<bucket>/<prefix>/<namespace>/<job>/<uid>/``::

    checkpoints/checkpoint-<step>/<files of every node, same relative paths as on disk>
    checkpoints/checkpoint-<step>/_nodes/node-<rank>.json   # one per node: its files, sizes, sha256
    checkpoints/checkpoint-<step>/manifest.json             # written LAST by global rank 0
    final/                                                  # the trained output (upload_final)
    metrics.json                                            # write_json

Protocol (see docs/checkpoints.md):

1. After a save, the leader process of every node uploads the node's checkpoint directory with the
   same relative paths as on disk: no per-node prefix, so a downloaded checkpoint is a plain
   Hugging Face checkpoint directory. Per-rank files (``rng_state_<rank>.pth``,
   ``global_step*/zero_pp_rank_<rank>_*``) have distinct names already; a name present on several
   nodes must have identical contents there, otherwise the checkpoint is rejected (CheckpointConflictError).
2. Then it writes ``_nodes/node-<rank>.json`` listing its files with sizes and sha256.
3. Global rank 0 (node 0) waits for every node's list, checks that every listed object exists
   with the listed size, and only then writes ``manifest.json`` with all files, step, time and world.
4. A checkpoint without a manifest does not exist. ``latest_complete`` also checks that all
   manifest-listed objects exist with the right sizes; ``download`` verifies every sha256.
5. Deletion removes ``manifest.json`` FIRST, so a half-deleted checkpoint is incomplete, never picked,
   and later garbage-collected by ``prune``.

An S3 PUT is atomic (multipart uploads appear only on completion), so a process killed at any moment
leaves either no manifest (the checkpoint is ignored) or a manifest whose objects were all there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.s3.transfer import TransferConfig

from .errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointIncompleteError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    TransferError,
)
from .objects import delete_keys, delete_object, get_bytes, list_sizes, put_json
from .retry import RetryPolicy
from .transfer import FileEntry, download_files, hash_files, list_local_files, upload_files
from .uri import S3Uri

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers' Trainer state, inside each checkpoint
NODES_DIR = "_nodes"
MANIFEST_FORMAT = "kubetune.io/checkpoint-manifest/v1"
NODE_LIST_FORMAT = "kubetune.io/checkpoint-node-files/v1"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_step(name: str) -> int | None:
    """The step of a Trainer checkpoint folder named ``checkpoint-<step>``, else None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    sha256: str
    node: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "node": self.node}


@dataclass(frozen=True)
class Manifest:
    step: int
    created_at: str
    num_nodes: int
    world_size: int | None
    files: tuple[ManifestFile, ...]
    run_id: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "step": self.step,
            "createdAt": self.created_at,
            "world": {"numNodes": self.num_nodes, "worldSize": self.world_size},
            "runId": self.run_id,
            "totalBytes": self.total_bytes,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Manifest:
        """Parse and validate; raises CheckpointError naming ``source`` and the bad field."""

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{source} is not a valid checkpoint manifest: {why}")

        if not isinstance(data, dict):
            raise bad("the document is not a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise bad(f"field 'format' is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise bad(f"field 'step' must be a non-negative integer, got {step!r}")
        world = data.get("world")
        if not isinstance(world, dict) or not isinstance(world.get("numNodes"), int):
            raise bad("field 'world.numNodes' must be an integer")
        files_raw = data.get("files")
        if not isinstance(files_raw, list):
            raise bad("field 'files' must be a list")
        files = []
        for i, f in enumerate(files_raw):
            if not isinstance(f, dict):
                raise bad(f"files[{i}] is not an object")
            path, size, sha, node = f.get("path"), f.get("size"), f.get("sha256"), f.get("node", 0)
            if not isinstance(path, str) or not _is_safe_relpath(path):
                raise bad(f"files[{i}].path {path!r} is not a safe relative path")
            if not isinstance(size, int) or size < 0:
                raise bad(f"files[{i}].size must be a non-negative integer, got {size!r}")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise bad(f"files[{i}].sha256 must be 64 lowercase hex digits, got {sha!r}")
            files.append(ManifestFile(path, size, sha, int(node)))
        return cls(
            step=step,
            created_at=str(data.get("createdAt", "")),
            num_nodes=world["numNodes"],
            world_size=world.get("worldSize"),
            files=tuple(files),
            run_id=data.get("runId"),
        )


@dataclass(frozen=True)
class CheckpointStatus:
    """What a checkpoint prefix holds: ``complete`` means resume may use it."""

    step: int
    uri: str
    has_manifest: bool
    complete: bool
    problem: str | None = None


@dataclass(frozen=True)
class UploadResult:
    step: int
    uri: str
    files: list[FileEntry]  # this node's files
    manifest: Manifest | None  # set on the node that wrote the manifest
    seconds: float
    bytes: int


@dataclass(frozen=True)
class PruneResult:
    deleted: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # complete checkpoints left, oldest first
    best: int | None = None  # the best checkpoint's step (kept whatever keep_last says), if known


def best_step_from_state(state: Any) -> int | None:
    """The best checkpoint's step recorded in a Trainer state document (``trainer_state.json``).

    ``best_global_step`` when present (transformers >= 4.50), else the step in the name of
    ``best_model_checkpoint`` (an absolute path on the machine that wrote it); None when the
    run tracks no best model.
    """
    if not isinstance(state, dict):
        return None
    step = state.get("best_global_step")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0:
        return step
    path = state.get("best_model_checkpoint")
    if isinstance(path, str):
        return checkpoint_step(PurePosixPath(path.replace("\\", "/")).name)
    return None


def _is_safe_relpath(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def merge_node_lists(node_files: Mapping[int, Sequence[FileEntry]]) -> tuple[ManifestFile, ...]:
    """All nodes' files as one list; a path on several nodes must have the same size and sha256."""
    merged: dict[str, ManifestFile] = {}
    for node in sorted(node_files):
        for f in node_files[node]:
            seen = merged.get(f.path)
            if seen is None:
                merged[f.path] = ManifestFile(f.path, f.size, f.sha256, node)
            elif (seen.sha256, seen.size) != (f.sha256, f.size):
                raise CheckpointConflictError(
                    f"checkpoint file {f.path!r} differs between node {seen.node} (sha256 {seen.sha256[:12]}…, "
                    f"{seen.size} bytes) and node {node} (sha256 {f.sha256[:12]}…, {f.size} bytes): a file "
                    "name may appear on several nodes only with identical contents; write shared files "
                    "on one node only (e.g. leave TrainingArguments.save_on_each_node off)"
                )
    return tuple(sorted(merged.values(), key=lambda f: f.path))


class CheckpointStore:
    """Checkpoints of one job under ``root_uri`` (``s3://bucket/prefix/<ns>/<job>/<uid>/``).

    ``on_object_written`` is called with the URI of every object this store writes, in order
    (data files, then the node list, then the manifest): for metrics, logs, or fault injection.
    ``run_id`` (e.g. the job's attempt number) tags node lists so that rank 0 never merges a list
    left behind by an earlier, killed attempt at the same step.
    """

    def __init__(
        self,
        root_uri: str | S3Uri,
        *,
        client: Any = None,
        transfer_config: TransferConfig | None = None,
        retry: RetryPolicy | None = None,
        on_object_written: Callable[[S3Uri], None] | None = None,
        node_wait_timeout_s: float = 900.0,
        node_poll_interval_s: float = 2.0,
        run_id: str | None = None,
    ) -> None:
        self.root = S3Uri.parse(root_uri, field="checkpoint root URI")
        self._client = client
        self.transfer_config = transfer_config
        self.retry = retry or RetryPolicy()
        self.on_object_written = on_object_written
        self.node_wait_timeout_s = node_wait_timeout_s
        self.node_poll_interval_s = node_poll_interval_s
        self.run_id = run_id

    @property
    def client(self) -> Any:
        if self._client is None:
            from .client import s3_client_from_env

            self._client = s3_client_from_env()
        return self._client

    # -- layout ---------------------------------------------------------------------------------

    @property
    def checkpoints_prefix(self) -> S3Uri:
        return self.root.join("checkpoints/")

    def checkpoint_uri(self, step: int) -> S3Uri:
        return self.root.join(f"checkpoints/checkpoint-{_check_step(step)}/")

    def _manifest_uri(self, step: int) -> S3Uri:
        return self.checkpoint_uri(step).join(MANIFEST_NAME)

    def _node_list_uri(self, step: int, node_rank: int) -> S3Uri:
        return self.checkpoint_uri(step).join(f"{NODES_DIR}/node-{node_rank}.json")

    def _written(self, uri: S3Uri) -> None:
        if self.on_object_written:
            self.on_object_written(uri)

    # -- reading --------------------------------------------------------------------------------

    def _scan(self) -> dict[int, dict[str, int]]:
        """step -> {relative path: size} of every object under ``checkpoints/``, in one listing.

        One listing instead of a delimiter listing per step: S3-compatible servers differ on
        whether emptied "directories" still show up, and the sizes are needed anyway.
        """
        prefix = self.checkpoints_prefix
        found: dict[int, dict[str, int]] = {}
        for key, size in list_sizes(self.client, prefix, policy=self.retry).items():
            top, _, rel = prefix.relative_key(key).partition("/")
            step = checkpoint_step(top)
            if step is not None and rel:
                found.setdefault(step, {})[rel] = size
        return found

    def list_steps(self) -> list[int]:
        """Steps that have objects under ``checkpoint-<step>/`` (complete or not), ascending."""
        return sorted(self._scan())

    def read_manifest(self, step: int) -> Manifest | None:
        """The manifest of ``step``, or None when there is none; raises CheckpointError if malformed."""
        uri = self._manifest_uri(step)
        raw = get_bytes(self.client, uri, policy=self.retry)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{uri} is not valid JSON: {e}") from None
        manifest = Manifest.from_json(data, str(uri))
        if manifest.step != step:
            raise CheckpointError(f"{uri} records step {manifest.step}, but lies under checkpoint-{step}")
        return manifest

    def status(self, step: int, objects: dict[str, int] | None = None) -> CheckpointStatus:
        """Whether ``step`` is complete: manifest present and every listed object has its size.

        ``objects`` (relative path -> size) saves a listing when the caller has one.
        """
        uri = str(self.checkpoint_uri(step))
        if objects is not None and MANIFEST_NAME not in objects:
            return CheckpointStatus(step, uri, False, False, "no manifest.json (incomplete upload)")
        try:
            manifest = self.read_manifest(step)
        except CheckpointError as e:
            return CheckpointStatus(step, uri, True, False, str(e))
        if manifest is None:
            return CheckpointStatus(step, uri, False, False, "no manifest.json (incomplete upload)")
        problem = self._missing_objects(step, manifest, objects)
        return CheckpointStatus(step, uri, True, problem is None, problem)

    def _missing_objects(
        self, step: int, manifest: Manifest, objects: dict[str, int] | None = None
    ) -> str | None:
        if objects is None:
            prefix = self.checkpoint_uri(step)
            objects = {
                prefix.relative_key(k): v
                for k, v in list_sizes(self.client, prefix, policy=self.retry).items()
            }
        bad = []
        for f in manifest.files:
            actual = objects.get(f.path)
            if actual != f.size:
                bad.append(
                    f"{f.path} ({'missing' if actual is None else f'{actual} bytes, expected {f.size}'})"
                )
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return (
                f"manifest lists objects that are missing or have the wrong size: {', '.join(bad[:3])}{more}"
            )
        return None

    def list_checkpoints(self) -> list[CheckpointStatus]:
        """The status of every checkpoint prefix, oldest first."""
        return [self.status(step, objects) for step, objects in sorted(self._scan().items())]

    def complete_steps(self) -> list[int]:
        return [s.step for s in self.list_checkpoints() if s.complete]

    def latest_complete(self) -> int | None:
        """The newest complete step (see :meth:`status`), or None; incomplete ones are skipped."""
        for step, objects in sorted(self._scan().items(), reverse=True):
            st = self.status(step, objects)
            if st.complete:
                return step
            log.info("skipping checkpoint %s: %s", st.uri, st.problem)
        return None

    def best_step(self, step: int) -> int | None:
        """The best checkpoint recorded in ``trainer_state.json`` of checkpoint ``step`` (or None)."""
        raw = get_bytes(self.client, self.checkpoint_uri(step).join(TRAINER_STATE_NAME), policy=self.retry)
        if raw is None:
            return None
        try:
            return best_step_from_state(json.loads(raw))
        except ValueError:
            log.warning("checkpoint %s: %s is not valid JSON", self.checkpoint_uri(step), TRAINER_STATE_NAME)
            return None

    # -- upload ---------------------------------------------------------------------------------

    def upload(
        self,
        local_dir: str | os.PathLike[str],
        step: int,
        node_rank: int = 0,
        write_manifest: bool = True,
        *,
        num_nodes: int = 1,
        world_size: int | None = None,
    ) -> UploadResult:
        """Upload this node's checkpoint files; with ``write_manifest`` (global rank 0, node 0)
        wait for every node's file list and write the manifest last."""
        step = _check_step(step)
        if num_nodes < 1:
            raise CheckpointError(f"num_nodes must be >= 1, got {num_nodes}")
        if not 0 <= node_rank < num_nodes:
            raise CheckpointError(
                f"node_rank {node_rank} is outside 0..{num_nodes - 1} (num_nodes={num_nodes})"
            )
        if write_manifest and node_rank != 0:
            raise CheckpointError(f"only node 0 (global rank 0) writes the manifest, not node {node_rank}")
        started = time.monotonic()
        prefix = self.checkpoint_uri(step)
        local = list_local_files(local_dir)
        for rel, _ in local:
            if rel == MANIFEST_NAME or rel.startswith(NODES_DIR + "/"):
                raise CheckpointError(
                    f"{Path(local_dir) / rel}: the names {MANIFEST_NAME!r} and {NODES_DIR + '/'!r} are reserved "
                    "for kubetune's checkpoint protocol; rename the file"
                )
        if write_manifest:
            # Re-uploading a step: the old manifest must not vouch for objects being replaced.
            delete_object(self.client, self._manifest_uri(step), policy=self.retry)

        entries = hash_files(local)
        upload_files(
            self.client,
            [(path, prefix.join(rel)) for rel, path in local],
            config=self.transfer_config,
            policy=self.retry,
            on_uploaded=self._written,
            what=f"checkpoint {step} upload (node {node_rank})",
        )
        node_list_uri = self._node_list_uri(step, node_rank)
        put_json(
            self.client,
            node_list_uri,
            {
                "format": NODE_LIST_FORMAT,
                "step": step,
                "node": node_rank,
                "runId": self.run_id,
                "createdAt": _now(),
                "files": [e.to_json() for e in entries],
            },
            policy=self.retry,
        )
        self._written(node_list_uri)

        manifest = None
        if write_manifest:
            node_files = {node_rank: entries, **self._wait_for_node_lists(step, num_nodes, skip=node_rank)}
            manifest = Manifest(
                step=step,
                created_at=_now(),
                num_nodes=num_nodes,
                world_size=world_size,
                files=merge_node_lists(node_files),
                run_id=self.run_id,
            )
            problem = self._missing_objects(step, manifest)
            if problem:
                raise CheckpointIncompleteError(f"checkpoint {prefix} not completed: {problem}")
            manifest_uri = self._manifest_uri(step)
            put_json(self.client, manifest_uri, manifest.to_json(), policy=self.retry)
            self._written(manifest_uri)
            log.info(
                "checkpoint %s complete: %d files, %.1f MB from %d node(s)",
                prefix,
                len(manifest.files),
                manifest.total_bytes / 1e6,
                num_nodes,
            )
        return UploadResult(
            step=step,
            uri=str(prefix),
            files=entries,
            manifest=manifest,
            seconds=time.monotonic() - started,
            bytes=sum(e.size for e in entries),
        )

    def _read_node_list(self, step: int, node: int) -> list[FileEntry] | None:
        uri = self._node_list_uri(step, node)
        raw = get_bytes(self.client, uri, policy=self.retry)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if data.get("format") != NODE_LIST_FORMAT or data.get("step") != step or data.get("node") != node:
                raise ValueError("format, step or node field does not match")
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{uri} is not a valid node file list: {e}") from None
        if self.run_id is not None and data.get("runId") != self.run_id:
            return None  # left by another attempt; this one's node has not finished yet
        for f in files:
            if not _is_safe_relpath(f.path) or not _SHA256.match(f.sha256):
                raise CheckpointError(f"{uri} lists an invalid file entry: {f}")
        return files

    def _wait_for_node_lists(self, step: int, num_nodes: int, skip: int) -> dict[int, list[FileEntry]]:
        found: dict[int, list[FileEntry]] = {}
        deadline = time.monotonic() + self.node_wait_timeout_s
        missing = [n for n in range(num_nodes) if n != skip]
        while True:
            for node in list(missing):
                files = self._read_node_list(step, node)
                if files is not None:
                    found[node] = files
                    missing.remove(node)
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise CheckpointIncompleteError(
                    f"checkpoint {self.checkpoint_uri(step)} not completed: node(s) {missing} did not upload "
                    f"their file lists within {self.node_wait_timeout_s:.0f}s (see those nodes' logs)"
                )
            time.sleep(self.node_poll_interval_s)

    # -- download -------------------------------------------------------------------------------

    def download(self, step: int, dest_dir: str | os.PathLike[str]) -> Path:
        """Download checkpoint ``step`` into ``dest_dir/checkpoint-<step>`` and return that path.

        Every file's sha256 is verified; files go to a hidden temporary directory that is renamed
        into place at the end, so an interrupted download never looks like a local checkpoint.
        """
        step = _check_step(step)
        manifest = self.read_manifest(step)
        if manifest is None:
            raise CheckpointNotFoundError(
                f"checkpoint {self.checkpoint_uri(step)} has no manifest.json: it does not exist or is "
                f"incomplete (complete checkpoints: {self.complete_steps() or 'none'})"
            )
        problem = self._missing_objects(step, manifest)
        if problem:
            raise CheckpointIncompleteError(f"checkpoint {self.checkpoint_uri(step)} is broken: {problem}")
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"checkpoint-{step}"
        tmp = dest / f".checkpoint-{step}.partial-{uuid.uuid4().hex[:8]}"
        prefix = self.checkpoint_uri(step)
        try:
            download_files(
                self.client,
                [(prefix.join(f.path), tmp.joinpath(*f.path.split("/")), f.sha256) for f in manifest.files],
                config=self.transfer_config,
                policy=self.retry,
                what=f"checkpoint {step} download",
            )
            tmp.mkdir(parents=True, exist_ok=True)  # a checkpoint may (oddly) list no files
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded checkpoint %s to %s (%d files)", prefix, target, len(manifest.files))
        return target

    def restore_latest(self, dest_dir: str | os.PathLike[str]) -> tuple[int, Path] | None:
        """Download the newest complete checkpoint; if its checksums keep failing, fall back to
        the next older one. Returns (step, path) or None when there is no complete checkpoint."""
        for step, objects in sorted(self._scan().items(), reverse=True):
            st = self.status(step, objects)
            if not st.complete:
                log.info("skipping checkpoint %s: %s", st.uri, st.problem)
                continue
            try:
                return step, self.download(step, dest_dir)
            except ChecksumMismatchError as e:
                log.error("checkpoint %s is corrupt, trying an older one: %s", st.uri, e)
        return None

    # -- deletion -------------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete a checkpoint: the manifest first, then everything else under its prefix."""
        delete_object(self.client, self._manifest_uri(step), policy=self.retry)
        keys = sorted(list_sizes(self.client, self.checkpoint_uri(step), policy=self.retry))
        delete_keys(self.client, self.root.bucket, keys, policy=self.retry)

    def prune(self, keep_last: int) -> PruneResult:
        """Keep the newest ``keep_last`` complete checkpoints and the best one; delete older complete
        ones and every incomplete one older than the newest complete one (left by killed uploads or
        deletions).

        The best checkpoint is the one ``trainer_state.json`` of the newest complete checkpoint
        names (``best_global_step`` / ``best_model_checkpoint``): it is what ``load_best_model_at_end``
        reloads at the end, so it must outlive a preemption even when it is older than the last
        ``keep_last``. Incomplete checkpoints newer than the newest complete one are left alone: they
        may be uploads in progress. Call this from global rank 0 only, after its upload returned.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise CheckpointError(
                f"keep_last (checkpointing.keepLast) must be an integer >= 1, got {keep_last!r}"
            )
        statuses = self.list_checkpoints()
        complete = [s.step for s in statuses if s.complete]
        keep = set(complete[-keep_last:])
        newest = complete[-1] if complete else None
        best = self.best_step(newest) if newest is not None else None
        if best is not None and best in complete:
            keep.add(best)
        elif best is not None:
            log.warning(
                "checkpoint %s names checkpoint-%d as the best, which is not a complete checkpoint in %s",
                self.checkpoint_uri(newest),  # type: ignore[arg-type]
                best,
                self.checkpoints_prefix,
            )
            best = None
        deleted = []
        for st in statuses:
            if st.step in keep:
                continue
            if st.complete or (newest is not None and st.step < newest):
                log.info("pruning checkpoint %s (%s)", st.uri, "old" if st.complete else st.problem)
                self.delete(st.step)
                deleted.append(st.step)
        return PruneResult(deleted=deleted, kept=sorted(keep), best=best)

    def discard_incomplete(self, after_step: int | None = None) -> list[int]:
        """Delete incomplete checkpoints newer than ``after_step`` (all when None).

        For global rank 0 at the start of an attempt, before training begins (so before any node
        can upload): clears leftovers of a killed attempt that the new one will overwrite.
        """
        discarded = []
        for st in self.list_checkpoints():
            if not st.complete and (after_step is None or st.step > after_step):
                self.delete(st.step)
                discarded.append(st.step)
        return discarded

    # -- final output and documents ---------------------------------------------------------------

    @property
    def final_uri(self) -> S3Uri:
        return self.root.join("final/")

    def upload_final(self, local_dir: str | os.PathLike[str]) -> list[FileEntry]:
        """Upload the trained output to ``root/final/``; objects of an earlier attempt that are not
        part of this output are removed afterwards."""
        prefix = self.final_uri
        local = list_local_files(local_dir)
        if not local:
            raise TransferError(f"{local_dir} is empty: nothing to upload as the final output")
        entries = hash_files(local)
        upload_files(
            self.client,
            [(path, prefix.join(rel)) for rel, path in local],
            config=self.transfer_config,
            policy=self.retry,
            on_uploaded=self._written,
            what=f"upload of {local_dir} to {prefix}",
        )
        wanted = {prefix.join(rel).key for rel, _ in local}
        stale = sorted(k for k in list_sizes(self.client, prefix, policy=self.retry) if k not in wanted)
        if stale:
            delete_keys(self.client, prefix.bucket, stale, policy=self.retry)
        return entries

    def write_json(self, name: str, obj: Any) -> S3Uri:
        """Write a JSON document (e.g. ``metrics.json``) under the job root."""
        if not _is_safe_relpath(name):
            raise CheckpointError(f"document name {name!r} must be a relative path without '.' or '..' parts")
        uri = self.root.join(name)
        put_json(self.client, uri, obj, policy=self.retry)
        self._written(uri)
        return uri

    def read_json(self, name: str) -> Any | None:
        if not _is_safe_relpath(name):
            raise CheckpointError(f"document name {name!r} must be a relative path without '.' or '..' parts")
        raw = get_bytes(self.client, self.root.join(name), policy=self.retry)
        return None if raw is None else json.loads(raw)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return step
