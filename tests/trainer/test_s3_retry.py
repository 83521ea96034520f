"""Retry policy and error classification (pure functions: no server needed)."""

from __future__ import annotations

import random

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from s3transfer.exceptions import RetriesExceededError

from kubetune_trainer.storage import ChecksumMismatchError, RetryPolicy, call_with_retry, is_retryable
from kubetune_trainer.storage.retry import describe_error


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("SlowDown", 503), True),
        (client_error("TooManyRequests", 429), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("BadDigest", 400), True),
        (client_error("NoSuchBucket", 404), False),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (client_error("SignatureDoesNotMatch", 403), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionResetError(104, "reset"), True),
        (NoCredentialsError(), False),
        (FileNotFoundError(2, "gone"), False),
        (PermissionError(13, "denied"), False),
        (ChecksumMismatchError("bad"), True),
        (RetriesExceededError(ConnectionResetError(104, "reset")), True),
        (RetriesExceededError(client_error("AccessDenied", 403)), False),
        (ValueError("a bug"), False),
    ],
)
def test_is_retryable(exc: BaseException, expected: bool) -> None:
    assert is_retryable(exc) is expected


def test_cause_chain_decides_for_wrappers() -> None:
    try:
        try:
            raise client_error("NoSuchBucket", 404)
        except ClientError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_retryable(outer) is False
        assert describe_error(outer) == "NoSuchBucket (HTTP 404): NoSuchBucket happened"


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(attempts=7, base_delay_s=1.0, max_delay_s=10.0, jitter=0.0)
    assert list(policy.delays()) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    jittered = list(
        RetryPolicy(attempts=5, base_delay_s=1.0, max_delay_s=4.0, jitter=0.25).delays(random.Random(7))
    )
    for got, nominal in zip(jittered, [1.0, 2.0, 4.0, 4.0], strict=True):
        assert nominal * 0.75 <= got <= nominal * 1.25
    assert len(set(jittered)) == 4


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_delay_s": -1}, {"jitter": 1.0}])
def test_policy_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_call_with_retry_retries_transient_errors_then_succeeds() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise client_error("ServiceUnavailable", 503)
        return "ok"

    policy = RetryPolicy(attempts=5, base_delay_s=0.5, jitter=0.0)
    assert call_with_retry(flaky, "PUT x", policy, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0]


def test_call_with_retry_gives_up_after_attempts_and_never_retries_fatal_errors() -> None:
    sleeps: list[float] = []
    with pytest.raises(ClientError, match="InternalError"):
        call_with_retry(
            lambda: (_ for _ in ()).throw(client_error("InternalError", 500)),
            "PUT x",
            RetryPolicy(attempts=3, jitter=0.0, base_delay_s=0.1),
            sleep=sleeps.append,
        )
    assert sleeps == [0.1, 0.2]
    sleeps.clear()
    with pytest.raises(ClientError, match="AccessDenied"):
        call_with_retry(
            lambda: (_ for _ in ()).throw(client_error("AccessDenied", 403)), "PUT x", sleep=sleeps.append
        )
    assert sleeps == []
