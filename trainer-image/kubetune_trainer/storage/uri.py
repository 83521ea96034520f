"""``s3://bucket/key`` URIs: parsing with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import S3UriError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_EXAMPLE = "s3://my-bucket/some/prefix"


def _bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name (AWS naming rules), or None."""
    if not bucket:
        return "the bucket name is empty"
    if not 3 <= len(bucket) <= 63:
        return f"bucket name {bucket!r} must be 3 to 63 characters long"
    if bucket != bucket.lower():
        return f"bucket name {bucket!r} must be lowercase"
    if not _BUCKET_RE.match(bucket):
        return (
            f"bucket name {bucket!r} may contain only lowercase letters, digits, '.' and '-', "
            "and must start and end with a letter or digit"
        )
    if ".." in bucket:
        return f"bucket name {bucket!r} must not contain '..'"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return f"bucket name {bucket!r} must not be formatted as an IP address"


def _key_problem(key: str) -> str | None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return "the key contains control characters"
    if len(key.encode()) > 1024:
        return "the key is longer than S3's limit of 1024 bytes"
    segments = key.rstrip("/").split("/") if key else []
    if "" in segments:
        return "the key contains an empty path segment ('//')"
    if any(s in (".", "..") for s in segments):
        return "the key contains a '.' or '..' segment"
    return None


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key (no leading slash); ``key`` may be a prefix ending with '/'."""

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        problem = _bucket_problem(self.bucket) or _key_problem(self.key)
        if problem:
            raise S3UriError(f"invalid S3 location s3://{self.bucket}/{self.key}: {problem}")

    @classmethod
    def parse(cls, value: object, *, field: str = "S3 URI") -> S3Uri:
        """Parse ``s3://bucket[/key]``; ``field`` names the setting in error messages."""
        if isinstance(value, S3Uri):
            return value
        if not isinstance(value, str):
            raise S3UriError(f"{field} must be a string like {_EXAMPLE!r}, got {type(value).__name__}")
        text = value.strip()
        if not text:
            raise S3UriError(f"{field} is empty: set it to a URI like {_EXAMPLE!r}")
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise S3UriError(f"{field} {value!r} has no scheme: write it as {_EXAMPLE!r}")
        if scheme.lower() in ("http", "https"):
            raise S3UriError(
                f"{field} {value!r} is an HTTP URL: write the location as {_EXAMPLE!r} and put the "
                "server address in AWS_ENDPOINT_URL (or the job's storage.endpoint)"
            )
        if scheme != "s3":
            raise S3UriError(f"{field} {value!r} has scheme {scheme!r}: only 's3://' is supported")
        bucket, _, key = rest.partition("/")
        problem = _bucket_problem(bucket) or _key_problem(key)
        if problem:
            raise S3UriError(f"{field} {value!r} is not a valid S3 URI: {problem} (example: {_EXAMPLE!r})")
        return cls(bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a "directory" prefix: ends with '/' unless it is the bucket root."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def join(self, *parts: str) -> S3Uri:
        """Append path segments ('a/b' style parts are split; empty parts are ignored)."""
        segments = [s for part in parts for s in part.split("/") if s]
        key = self.prefix + "/".join(segments)
        if parts and parts[-1].endswith("/") and segments:
            key += "/"
        return S3Uri(self.bucket, key)

    def relative_key(self, key: str) -> str:
        """The part of ``key`` below this prefix (raises when ``key`` is outside it)."""
        if not key.startswith(self.prefix):
            raise S3UriError(f"key {key!r} is not under {self}")
        return key[len(self.prefix) :]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"
