"""Errors raised by the storage package.

Every message names the URI, file or environment variable at fault and says how to fix it,
because these surface in pod logs and in the FineTuneJob's status.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by kubetune_trainer.storage."""


class S3UriError(StorageError, ValueError):
    """A string is not a usable ``s3://bucket/prefix`` URI."""


class S3ConfigError(StorageError, ValueError):
    """The S3 client settings (environment or arguments) are invalid."""


class TransferError(StorageError):
    """An upload or download failed for good (after retries, or for a non-retryable reason)."""


class CheckpointError(StorageError):
    """Base class of checkpoint protocol errors."""


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint has no manifest (it does not exist, or is incomplete)."""


class CheckpointIncompleteError(CheckpointError):
    """A checkpoint could not be completed, or a manifest lists objects that are missing."""


class CheckpointConflictError(CheckpointError):
    """Two nodes uploaded different contents under the same file name."""


class ChecksumMismatchError(CheckpointError):
    """A downloaded file does not match the sha256 recorded in the manifest."""
