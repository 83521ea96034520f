"""The RBAC-denial check the operator tests use must not be fooled by a timestamp."""

from tests.integration.operator_support import rbac_denials


def test_a_timestamp_ending_in_403_is_not_a_denial() -> None:
    log = (
        "[2026-12-06 01:50:28,403] kubetune_operator [INFO    ] kubetune operator starting\n"
        "[2026-12-06 01:50:29,001] kopf.objects [ERROR   ] (403) Reason: Forbidden: jobs.batch is forbidden\n"
        "[2026-12-06 01:50:30,002] kopf.objects [ERROR   ] (403) Forbidden: NamespaceTerminating\n"
    )
    assert rbac_denials(log) == [
        "[2026-12-06 01:50:29,001] kopf.objects [ERROR   ] (403) Reason: Forbidden: jobs.batch is forbidden"
    ]
