"""Directory uploads and prefix downloads through boto3's transfer manager.

s3transfer does the heavy lifting (multipart above ``multipart_threshold``, several files and
parts in flight at once); this module adds a retry round with exponential backoff around
whole-file failures that outlive botocore's per-request retries, sha256 of every file, and
checksum verification on download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from .errors import ChecksumMismatchError, TransferError
from .objects import list_sizes
from .retry import RetryPolicy, describe_error, is_retryable
from .uri import S3Uri

log = logging.getLogger(__name__)

MB = 1024 * 1024
# 64 MiB parts keep a 10 GB shard under S3's 10,000-part limit with room to spare.
DEFAULT_TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=64 * MB,
    multipart_chunksize=64 * MB,
    max_concurrency=8,
    use_threads=True,
    preferred_transfer_client="classic",
)


@dataclass(frozen=True)
class FileEntry:
    """One file of an upload: path relative to the uploaded directory (POSIX separators)."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def sha256_file(path: Path, chunk_size: int = 8 * MB) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def hash_files(files: Sequence[tuple[str, Path]]) -> list[FileEntry]:
    """FileEntry (size, sha256) for each (relative path, path), hashed on several threads
    (hashlib releases the GIL on large buffers, so multi-GB shards hash in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
        digests = list(pool.map(lambda f: sha256_file(f[1]), files))
    return [FileEntry(rel, size, digest) for (rel, _), (digest, size) in zip(files, digests, strict=True)]


def list_local_files(local_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file below ``local_dir``, sorted."""
    root = Path(local_dir)
    if not root.is_dir():
        raise TransferError(f"cannot upload {root}: it is not a directory")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                raise TransferError(f"cannot upload {path}: it is a dangling symbolic link")
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    return files


@dataclass
class _Job:
    label: str
    submit: Callable[[Any], Any]  # manager -> s3transfer future
    done: Callable[[], None] = lambda: None  # verification/bookkeeping; may raise


def _transfer_all(
    client: Any,
    jobs: Sequence[_Job],
    *,
    config: TransferConfig | None,
    policy: RetryPolicy | None,
    what: str,
) -> None:
    """Run every job through one transfer manager; retry failed ones in backoff rounds."""
    from boto3.s3.transfer import create_transfer_manager

    policy = policy or RetryPolicy()
    delays = policy.delays()
    pending = list(jobs)
    round_no = 1
    with create_transfer_manager(client, config or DEFAULT_TRANSFER_CONFIG) as manager:
        while pending:
            futures = [(job, job.submit(manager)) for job in pending]
            failed: list[tuple[_Job, Exception]] = []
            for job, future in futures:
                try:
                    future.result()
                    job.done()
                except Exception as e:
                    if not is_retryable(e):
                        raise TransferError(
                            f"{what}: {job.label} failed: {describe_error(e)} (not retried: check the "
                            "bucket name, credentials and permissions)"
                        ) from e
                    failed.append((job, e))
            if not failed:
                return
            delay = next(delays, None)
            last_job, last_exc = failed[-1]
            if delay is None:
                raise TransferError(
                    f"{what}: {len(failed)} file(s) still failing after {policy.attempts} attempts, "
                    f"e.g. {last_job.label}: {describe_error(last_exc)}"
                ) from last_exc
            log.warning(
                "%s: %d file(s) failed (round %d/%d), e.g. %s: %s; retrying in %.1fs",
                what,
                len(failed),
                round_no,
                policy.attempts,
                last_job.label,
                describe_error(last_exc),
                delay,
            )
            time.sleep(delay)
            pending = [job for job, _ in failed]
            round_no += 1


def upload_files(
    client: Any,
    files: Sequence[tuple[Path, S3Uri]],
    *,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
    on_uploaded: Callable[[S3Uri], None] | None = None,
    what: str = "upload",
) -> None:
    """Upload each (local file, destination) pair; ``on_uploaded`` runs after each success."""

    def job(path: Path, dest: S3Uri) -> _Job:
        return _Job(
            label=f"{path} -> {dest}",
            submit=lambda m: m.upload(str(path), dest.bucket, dest.key),
            done=(lambda: on_uploaded(dest)) if on_uploaded else (lambda: None),
        )

    _transfer_all(client, [job(p, d) for p, d in files], config=config, policy=policy, what=what)


def upload_dir(
    local_dir: str | os.PathLike[str],
    dest: S3Uri | str,
    *,
    client: Any = None,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
    on_uploaded: Callable[[S3Uri], None] | None = None,
) -> list[FileEntry]:
    """Upload every file below ``local_dir`` to ``dest``/<relative path>; returns sizes and sha256."""
    from .client import s3_client_from_env

    dest = S3Uri.parse(dest, field="upload destination")
    client = client or s3_client_from_env()
    local = list_local_files(local_dir)
    entries = hash_files(local)
    upload_files(
        client,
        [(path, dest.join(rel)) for rel, path in local],
        config=config,
        policy=policy,
        on_uploaded=on_uploaded,
        what=f"upload of {local_dir} to {dest}",
    )
    return entries


def _safe_local_path(root: Path, rel: str, source: str) -> Path:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TransferError(
            f"refusing to download {source}: its relative path {rel!r} is not a safe file name"
        )
    return root.joinpath(*parts)


def download_files(
    client: Any,
    files: Sequence[tuple[S3Uri, Path, str | None]],
    *,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
    what: str = "download",
) -> None:
    """Download each (source, local file, expected sha256 or None); a mismatch is retried, then fatal."""

    def job(src: S3Uri, path: Path, expected: str | None) -> _Job:
        def verify() -> None:
            if expected is None:
                return
            actual, _ = sha256_file(path)
            if actual != expected:
                path.unlink(missing_ok=True)
                raise ChecksumMismatchError(
                    f"{src} downloaded with sha256 {actual}, but the manifest records {expected}"
                )

        def submit(manager: Any) -> Any:
            path.parent.mkdir(parents=True, exist_ok=True)
            return manager.download(src.bucket, src.key, str(path))

        return _Job(label=f"{src} -> {path}", submit=submit, done=verify)

    try:
        _transfer_all(client, [job(*f) for f in files], config=config, policy=policy, what=what)
    except TransferError as e:
        if isinstance(e.__cause__, ChecksumMismatchError):
            raise ChecksumMismatchError(str(e)) from e.__cause__
        raise


def download_prefix(
    src: S3Uri | str,
    local_dir: str | os.PathLike[str],
    *,
    client: Any = None,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
) -> list[Path]:
    """Download every object under ``src`` into ``local_dir`` (keeping relative paths)."""
    from .client import s3_client_from_env

    src = S3Uri.parse(src, field="download source")
    client = client or s3_client_from_env()
    root = Path(local_dir)
    sizes = list_sizes(client, src, policy=policy)
    keys = sorted(k for k in sizes if not k.endswith("/"))  # skip "folder" marker objects
    if not keys:
        raise TransferError(f"nothing to download: no objects under {src}")
    items = []
    for key in keys:
        path = _safe_local_path(root, src.relative_key(key), f"s3://{src.bucket}/{key}")
        items.append((S3Uri(src.bucket, key), path, None))
    download_files(client, items, config=config, policy=policy, what=f"download of {src} to {root}")
    return [p for _, p, _ in items]
