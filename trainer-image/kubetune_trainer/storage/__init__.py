"""S3 storage for the trainer: URIs, clients, transfers and the checkpoint protocol.

Importing this package imports boto3 (not torch, not the Kubernetes client).
"""

from .checkpoints import (
    CheckpointStatus,
    CheckpointStore,
    Manifest,
    ManifestFile,
    PruneResult,
    UploadResult,
    best_step_from_state,
    checkpoint_step,
    merge_node_lists,
)
from .client import S3Settings, make_s3_client, resolve_s3_settings, s3_client_from_env
from .errors import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointIncompleteError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    S3ConfigError,
    S3UriError,
    StorageError,
    TransferError,
)
from .retry import RetryPolicy, call_with_retry, is_retryable
from .transfer import DEFAULT_TRANSFER_CONFIG, FileEntry, download_prefix, sha256_file, upload_dir
from .uri import S3Uri

__all__ = [
    "DEFAULT_TRANSFER_CONFIG",
    "CheckpointConflictError",
    "CheckpointError",
    "CheckpointIncompleteError",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CheckpointStore",
    "ChecksumMismatchError",
    "FileEntry",
    "Manifest",
    "ManifestFile",
    "PruneResult",
    "RetryPolicy",
    "S3ConfigError",
    "S3Settings",
    "S3Uri",
    "S3UriError",
    "StorageError",
    "TransferError",
    "UploadResult",
    "best_step_from_state",
    "call_with_retry",
    "checkpoint_step",
    "download_prefix",
    "is_retryable",
    "make_s3_client",
    "merge_node_lists",
    "resolve_s3_settings",
    "s3_client_from_env",
    "sha256_file",
    "upload_dir",
]
