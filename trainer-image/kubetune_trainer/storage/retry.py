"""Retry with exponential backoff around whole S3 operations.

botocore already retries single HTTP requests (``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS``); this
layer retries a *whole* file transfer or API call when those retries are exhausted, e.g. while an
S3 endpoint restarts for longer than botocore's few seconds of backoff.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# 4xx codes that can succeed when repeated; every other 4xx is a caller/config error.
_RETRYABLE_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "OperationAborted",
        "InternalError",
        "ServiceUnavailable",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; delays grow ``base_delay_s * 2**n`` up to ``max_delay_s``.

    The default (8 tries, 0.5 s doubling to 30 s) rides out about two minutes of outage on top of
    botocore's own per-request retries.
    """

    attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.25  # +- fraction of each delay, so that nodes do not retry in lockstep

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The ``attempts - 1`` sleeps between tries."""
        rng = rng or random.Random()
        for n in range(self.attempts - 1):
            delay = min(self.max_delay_s, self.base_delay_s * (2**n))
            yield max(0.0, delay * (1 + rng.uniform(-self.jitter, self.jitter)))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        inner = getattr(current, "last_exception", None)  # s3transfer's RetriesExceededError
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)


def is_retryable(exc: BaseException) -> bool:
    """Whether repeating the operation may succeed (network trouble, 5xx, throttling)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        ParamValidationError,
        PartialCredentialsError,
    )

    from .errors import ChecksumMismatchError

    for e in _chain(exc):
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in _RETRYABLE_CODES or status >= 500 or status == 429
        if isinstance(e, NoCredentialsError | PartialCredentialsError | ParamValidationError | NoRegionError):
            return False
        if isinstance(e, BotoCoreError | ConnectionError | TimeoutError | ChecksumMismatchError):
            return True
        if type(e).__name__ in ("RetriesExceededError", "S3UploadFailedError", "S3DownloadFailedError"):
            continue  # wrappers: the cause decides
        if isinstance(e, OSError):
            return False  # local file problems: missing file, permissions, disk full
    # A wrapper with no classifiable cause: transient in practice (s3transfer gives up on sockets).
    return type(exc).__name__ in ("RetriesExceededError", "S3UploadFailedError", "S3DownloadFailedError")


def describe_error(exc: BaseException) -> str:
    """A one-line description without request headers (they may carry signatures)."""
    from botocore.exceptions import ClientError

    for e in _chain(exc):
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return f"{err.get('Code', 'error')} (HTTP {status}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def call_with_retry(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn``; on a retryable error sleep and try again, up to ``policy.attempts`` tries."""
    policy = policy or RetryPolicy()
    delays = policy.delays()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_retryable(e):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            log.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.1fs",
                what,
                attempt,
                policy.attempts,
                describe_error(e),
                delay,
            )
            sleep(delay)
            attempt += 1
