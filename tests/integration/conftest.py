"""Fixtures for the API tests on the real control plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.testground.cluster import REPO, ControlPlane

CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
CRD_NAMES = ("finetunejobs.kubetune.io", "adapterdeployments.kubetune.io", "finetunesweeps.kubetune.io")


@pytest.fixture(scope="session")
def kubetune_crds(cluster: ControlPlane) -> list[Path]:
    """The committed CRDs, applied server-side (as a GitOps tool would) and Established."""
    assert CRD_FILES, f"no CRDs in {REPO / 'crds'}: run `make generate`"
    for path in CRD_FILES:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    for name in CRD_NAMES:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    # The OpenAPI document (kubectl explain, client-side field checks) is published a moment later.
    for field in ("finetunejob.spec.baseModel", "adapterdeployment.spec.baseModel"):
        eventually(
            lambda f=field: cluster.kubectl("explain", f, check=False).returncode == 0,
            timeout=60,
            what=f"the published schema to contain {field}",
        )
    return CRD_FILES
