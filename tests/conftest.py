"""Session fixtures: one real control plane and one real SeaweedFS per test session.

Components that are missing make the tests fail loudly (never skip): a test ground that is
not there is a broken setup, not a reason to pass.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testground.cluster import ControlPlane
from tests.testground.images import app_version
from tests.testground.node import PAUSE_IMAGE, RealNode
from tests.testground.procs import wait_for
from tests.testground.registry import Registry
from tests.testground.s3 import SeaweedS3


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real kube-apiserver + controller-manager + scheduler + kwok (2 GPU nodes x 8, 1 CPU node)."""
    cp = ControlPlane(tmp_path_factory.mktemp("cluster"))
    cp.start()
    print(f"\n[testground] control plane up in {cp.startup_seconds:.1f}s at {cp.server}")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def registry(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The registry `make images` pushed to, serving the real node at the host end of its veth."""
    assert cluster.network is not None
    reg = Registry(tmp_path_factory.mktemp("registry"), host=cluster.network.host_ip).start()
    try:
        for name in ("operator", "trainer"):
            reg.require(f"kubetune/{name}", app_version())
        reg.require(*PAUSE_IMAGE.split(":"))
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def real_node(cluster: ControlPlane, registry: Registry) -> RealNode:
    """The cluster's real node (containerd + kubelet + kube-proxy + CoreDNS), started on first use;
    `cluster` tears it down. Pods reach it with tests.testground.node.scheduling()."""
    node = cluster.start_node(registry_port=registry.port)
    print(f"\n[testground] real node {node.name} Ready in {node.startup_seconds:.1f}s")
    return node


_ns_counter = itertools.count()


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (its default ServiceAccount exists before the test starts)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t{next(_ns_counter)}-{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)

    def has_default_sa() -> bool:
        return (
            cluster.kubectl("get", "serviceaccount", "default", namespace=name, check=False).returncode == 0
        )

    wait_for(has_default_sa, what=f"the default ServiceAccount in namespace {name}", timeout=30)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) with enforced credentials."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: SeaweedS3) -> str:
    """A fresh, empty bucket."""
    name = f"kt-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run a command, failing with its output (a helper for tests that drive CLIs)."""
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd
    )
    if res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def eventually(check, *, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    """Poll `check()` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f": {last_exc}" if last_exc else "")
    )
