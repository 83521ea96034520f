"""Small-object S3 operations (JSON documents, listings, deletes), each retried with backoff."""

from __future__ import annotations

import json
from typing import Any

from .errors import TransferError
from .retry import RetryPolicy, call_with_retry, describe_error, is_retryable
from .uri import S3Uri


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _fail(what: str, exc: BaseException) -> TransferError:
    hint = "" if is_retryable(exc) else " (not retried: check the bucket name, credentials and permissions)"
    return TransferError(f"{what} failed: {describe_error(exc)}{hint}")


def put_bytes(
    client: Any,
    uri: S3Uri,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    policy: RetryPolicy | None = None,
) -> None:
    try:
        call_with_retry(
            lambda: client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type),
            f"PUT {uri}",
            policy,
        )
    except Exception as e:
        raise _fail(f"writing {uri}", e) from e


def put_json(client: Any, uri: S3Uri, obj: Any, *, policy: RetryPolicy | None = None) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
    put_bytes(client, uri, data, content_type="application/json", policy=policy)


def get_bytes(client: Any, uri: S3Uri, *, policy: RetryPolicy | None = None) -> bytes | None:
    """The object's contents, or None when it does not exist."""

    def get() -> bytes | None:
        try:
            return client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
        except Exception as e:
            if _is_not_found(e):
                return None
            raise

    try:
        return call_with_retry(get, f"GET {uri}", policy)
    except Exception as e:
        raise _fail(f"reading {uri}", e) from e


def head_size(client: Any, uri: S3Uri, *, policy: RetryPolicy | None = None) -> int | None:
    """The object's size, or None when it does not exist."""

    def head() -> int | None:
        try:
            return int(client.head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"])
        except Exception as e:
            if _is_not_found(e):
                return None
            raise

    try:
        return call_with_retry(head, f"HEAD {uri}", policy)
    except Exception as e:
        raise _fail(f"reading {uri}", e) from e


def list_sizes(client: Any, prefix: S3Uri, *, policy: RetryPolicy | None = None) -> dict[str, int]:
    """key -> size of every object under ``prefix`` (whole listing retried as one operation)."""

    def listing() -> dict[str, int]:
        sizes: dict[str, int] = {}
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.prefix):
            for obj in page.get("Contents", []):
                sizes[obj["Key"]] = int(obj["Size"])
        return sizes

    try:
        return call_with_retry(listing, f"LIST {prefix}", policy)
    except Exception as e:
        raise _fail(f"listing {prefix}", e) from e


def delete_keys(client: Any, bucket: str, keys: list[str], *, policy: RetryPolicy | None = None) -> None:
    """Delete ``keys`` (1000 per request, S3's limit); missing keys are not an error."""
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]

        def delete(batch: list[str] = batch) -> None:
            resp = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = [e for e in resp.get("Errors", []) if e.get("Code") not in ("NoSuchKey", "404")]
            if errors:
                first = errors[0]
                raise TransferError(
                    f"deleting s3://{bucket}/{first.get('Key')} failed: {first.get('Code')}: "
                    f"{first.get('Message')} ({len(errors)} key(s) not deleted)"
                )

        try:
            call_with_retry(delete, f"DELETE {len(batch)} objects in s3://{bucket}", policy)
        except TransferError:
            raise
        except Exception as e:
            raise _fail(f"deleting objects in s3://{bucket}", e) from e


def delete_object(client: Any, uri: S3Uri, *, policy: RetryPolicy | None = None) -> None:
    try:
        call_with_retry(lambda: client.delete_object(Bucket=uri.bucket, Key=uri.key), f"DELETE {uri}", policy)
    except Exception as e:
        if not _is_not_found(e):
            raise _fail(f"deleting {uri}", e) from e
