"""The operator's watches select its own children on the server (kopf's label_selectors)."""

from __future__ import annotations

import kopf
import pytest

from kubetune_operator import meta
from kubetune_operator.adapterdeployment import builders as adep_builders
from kubetune_operator.finetunejob import builders as ftj_builders
from kubetune_operator.main import watch_only_owned_children
from kubetune_operator.settings import Settings
from tests.unit.test_api_cases import adapterdeployment, finetunejob


def selectors(group: str, version: str, plural: str) -> list[str]:
    settings = kopf.OperatorSettings()
    watch_only_owned_children(settings)
    return settings.watching.label_selectors.collect(kopf.Resource(group, version, plural))


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics for the two forms used here: `key` and `key=value`."""
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


@pytest.mark.parametrize(
    ("group", "plural", "owner_label"),
    [
        ("batch", "jobs", meta.LABEL_FINETUNEJOB),
        ("", "pods", meta.LABEL_FINETUNEJOB),
        ("apps", "deployments", meta.LABEL_ADAPTERDEPLOYMENT),
    ],
)
def test_child_watches_ask_the_server_for_owned_objects_only(
    group: str, plural: str, owner_label: str
) -> None:
    [selector] = selectors(group, "v1", plural)
    assert owner_label in selector.split(",")
    assert f"{meta.LABEL_MANAGED_BY}={meta.MANAGED_BY}" in selector.split(",")


def test_parent_watches_are_not_filtered() -> None:
    assert selectors(meta.GROUP, meta.VERSION, "finetunejobs") == []
    assert selectors(meta.GROUP, meta.VERSION, "adapterdeployments") == []


UID = "00000000-0000-0000-0000-000000000001"


def test_the_children_the_operator_renders_match_the_selectors() -> None:
    """If a builder ever dropped a label, the operator would stop seeing its own children."""
    ftj = finetunejob("sel")
    ftj["metadata"].update(namespace="ns", uid=UID)
    job = ftj_builders.job(ftj, 1, Settings())
    [ftj_selector] = selectors("batch", "v1", "jobs")
    assert matches(ftj_selector, job["metadata"]["labels"])
    assert matches(ftj_selector, job["spec"]["template"]["metadata"]["labels"])  # the pods
    assert not matches(ftj_selector, {meta.LABEL_FINETUNEJOB: "sel"})  # someone else's copy of the label

    adep = adapterdeployment("sel")
    adep["metadata"].update(namespace="ns", uid=UID)
    deployment = adep_builders.deployment(adep, [adep_builders.ResolvedAdapter("a", "s3://x/a/")], Settings())
    [adep_selector] = selectors("apps", "v1", "deployments")
    assert matches(adep_selector, deployment["metadata"]["labels"])
