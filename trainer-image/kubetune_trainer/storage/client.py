"""A boto3 S3 client configured from the standard AWS environment.

Read (explicit arguments win over the environment):

- ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: an S3-compatible server (SeaweedFS, MinIO, ...);
  unset means AWS itself.
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``); when unset, boto3's
  default chain (web identity, instance profile, ...) applies.
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``).
- ``AWS_RETRY_MODE`` (standard | adaptive | legacy, default standard) and ``AWS_MAX_ATTEMPTS``
  (default 8): botocore's per-request retries.
- ``KUBETUNE_S3_ADDRESSING_STYLE`` (path | virtual | auto): path-style is the default with a custom
  endpoint, because most self-hosted servers have no per-bucket DNS names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .errors import S3ConfigError

RETRY_MODES = ("standard", "adaptive", "legacy")
ADDRESSING_STYLES = ("path", "virtual", "auto")
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to build a client; ``repr`` never shows the secret."""

    endpoint_url: str | None
    region: str
    retry_mode: str
    max_attempts: int
    addressing_style: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_pool_connections: int = 32

    def __repr__(self) -> str:
        key = "set" if self.access_key_id else "default chain"
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"retry_mode={self.retry_mode!r}, max_attempts={self.max_attempts}, "
            f"addressing_style={self.addressing_style!r}, credentials={key})"
        )


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def resolve_s3_settings(
    env: Mapping[str, str] | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    retry_mode: str | None = None,
    max_attempts: int | None = None,
    addressing_style: str | None = None,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float = 60.0,
) -> S3Settings:
    """Validate and merge arguments and environment into :class:`S3Settings` (no network)."""
    env = os.environ if env is None else env

    endpoint_source = "endpoint_url"
    if endpoint_url is None:
        found = _first(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if found:
            endpoint_source, endpoint_url = found
    if endpoint_url is not None:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise S3ConfigError(
                f"{endpoint_source}={endpoint_url!r} is not a URL: expected http(s)://host[:port], "
                "e.g. http://seaweedfs.storage:8333"
            )
        try:
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise S3ConfigError(f"{endpoint_source}={endpoint_url!r} has an invalid port: {e}") from None

    if region is None:
        found = _first(env, "AWS_REGION", "AWS_DEFAULT_REGION")
        region = found[1] if found else DEFAULT_REGION

    mode_source = "retry_mode"
    if retry_mode is None:
        found = _first(env, "AWS_RETRY_MODE")
        mode_source, retry_mode = found if found else ("retry_mode", "standard")
    if retry_mode not in RETRY_MODES:
        raise S3ConfigError(f"{mode_source}={retry_mode!r} is invalid: use one of {', '.join(RETRY_MODES)}")

    attempts_source = "max_attempts"
    if max_attempts is None:
        found = _first(env, "AWS_MAX_ATTEMPTS")
        if found:
            attempts_source = found[0]
            try:
                max_attempts = int(found[1])
            except ValueError:
                raise S3ConfigError(
                    f"AWS_MAX_ATTEMPTS={found[1]!r} is not an integer: set it to e.g. 8"
                ) from None
        else:
            max_attempts = DEFAULT_MAX_ATTEMPTS
    if not 1 <= max_attempts <= 50:
        raise S3ConfigError(f"{attempts_source}={max_attempts} is out of range: use 1 to 50")

    style_source = "addressing_style"
    if addressing_style is None:
        found = _first(env, "KUBETUNE_S3_ADDRESSING_STYLE")
        if found:
            style_source, addressing_style = found
        else:
            addressing_style = "path" if endpoint_url else "auto"
    if addressing_style not in ADDRESSING_STYLES:
        raise S3ConfigError(
            f"{style_source}={addressing_style!r} is invalid: use one of {', '.join(ADDRESSING_STYLES)}"
        )

    key_id = env.get("AWS_ACCESS_KEY_ID") or None
    secret = env.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(key_id) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise S3ConfigError(
            f"{missing} is not set while its partner is: set both (the job's storage.secretRef Secret "
            "needs the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or neither"
        )
    return S3Settings(
        endpoint_url=endpoint_url,
        region=region,
        retry_mode=retry_mode,
        max_attempts=max_attempts,
        addressing_style=addressing_style,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )


def make_s3_client(settings: S3Settings) -> Any:
    """Build the boto3 client for ``settings``."""
    import boto3
    import botocore.config

    # total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS ("max_attempts" would not).
    retries: Any = {"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts}
    s3: Any = {"addressing_style": settings.addressing_style}
    config = botocore.config.Config(
        region_name=settings.region,
        retries=retries,
        s3=s3,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # The transfer manager runs several threads per file and several files at once.
        max_pool_connections=settings.max_pool_connections,
        tcp_keepalive=True,
    )
    # A private session: boto3's default session is not thread-safe to create lazily.
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def s3_client_from_env(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    retry_mode: str | None = None,
    max_attempts: int | None = None,
    addressing_style: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """A boto3 S3 client from the standard environment (see the module docstring)."""
    return make_s3_client(
        resolve_s3_settings(
            env,
            endpoint_url=endpoint_url,
            region=region,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            addressing_style=addressing_style,
        )
    )
