"""kube.retry_conflicts: 409 Conflicts and 429/5xx blips are retried, other errors are not."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune_operator import kube


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(kube.time, "sleep", slept.append)
    return slept


def flaky(*errors: ApiException, result: str = "ok"):
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


def conflict() -> ApiException:
    e = ApiException(status=409, reason="Conflict")
    e.body = '{"reason": "Conflict", "message": "the object has been modified"}'
    return e


def test_a_conflict_is_retried_then_succeeds(no_sleep: list[float]) -> None:
    fn, calls = flaky(conflict())
    assert kube.retry_conflicts(fn) == "ok"
    assert len(calls) == 2 and no_sleep == [0.05]


@pytest.mark.parametrize("status", [429, 500, 503, 504])
def test_throttling_and_server_errors_are_retried(status: int) -> None:
    fn, calls = flaky(ApiException(status=status), ApiException(status=status))
    assert kube.retry_conflicts(fn) == "ok" and len(calls) == 3


def test_a_conflict_that_never_clears_raises_after_the_last_attempt(no_sleep: list[float]) -> None:
    calls: list[int] = []

    def always() -> None:
        calls.append(1)
        raise conflict()

    with pytest.raises(ApiException) as info:
        kube.retry_conflicts(always, attempts=4)
    assert info.value.status == 409
    assert len(calls) == 4
    assert no_sleep == [0.05, 0.1, 0.2]  # backs off between attempts, not after the last


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_other_errors_are_not_retried(status: int) -> None:
    fn, calls = flaky(ApiException(status=status))
    with pytest.raises(ApiException):
        kube.retry_conflicts(fn)
    assert len(calls) == 1


def test_already_exists_is_not_retried() -> None:
    e = ApiException(status=409, reason="Conflict")
    e.body = '{"reason": "AlreadyExists", "message": "jobs.batch \\"x\\" already exists"}'
    fn, calls = flaky(e)
    with pytest.raises(ApiException):
        kube.retry_conflicts(fn)
    assert len(calls) == 1


PARENT = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "team-a", "uid": "u"},
}


class RefusingKube(kube.Kube):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, *args: object, **kwargs: object) -> None:
        raise self.error


def _refusal(status: int, body: str) -> ApiException:
    e = ApiException(status=status, reason="Forbidden")
    e.body = body
    return e


def test_an_event_into_a_terminating_namespace_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    body = '{"reason":"Forbidden","details":{"causes":[{"reason":"NamespaceTerminating"}]},"code":403}'
    RefusingKube(_refusal(403, body)).post_event(PARENT, "Running", "ok")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize(
    "error",
    [_refusal(403, '{"message":"events is forbidden: User cannot create"}'), ConnectionError("refused")],
    ids=["rbac", "network"],
)
def test_an_event_that_cannot_be_posted_is_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    RefusingKube(error).post_event(PARENT, "Running", "ok")  # never raises
    assert any("could not post event Running on team-a/j" in r.getMessage() for r in caplog.records)
