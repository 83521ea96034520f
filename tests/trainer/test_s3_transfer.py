"""upload_dir / download_prefix against a real SeaweedFS, including an endpoint that fails.

Faults are injected at the network level by a TCP proxy started in the test (no patched boto3):
it resets the first connections, cuts uploads mid-body, or stops listening for a while.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from boto3.s3.transfer import TransferConfig

from kubetune_trainer.storage import (
    RetryPolicy,
    S3Uri,
    TransferError,
    download_prefix,
    s3_client_from_env,
    upload_dir,
)

pytestmark = pytest.mark.s3

MB = 1024 * 1024
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=4)
FAST_RETRY = RetryPolicy(attempts=10, base_delay_s=0.2, max_delay_s=1.0)


class FlakyProxy:
    """A TCP proxy to ``upstream`` that misbehaves on purpose.

    - ``reset_first``: the first N connections are reset (RST) right after accept;
    - ``cut_first``: the next N connections are reset after forwarding ``cut_after`` request bytes
      (an upload dying mid-body);
    - ``down()`` / ``up()``: stop / resume listening (connection refused in between).
    """

    def __init__(
        self, upstream: tuple[str, int], reset_first: int = 0, cut_first: int = 0, cut_after: int = 0
    ):
        self.upstream = upstream
        self.reset_first, self.cut_first, self.cut_after = reset_first, cut_first, cut_after
        self.accepted = self.resets = self.cuts = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopped = False
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            listener.close()

    def close(self) -> None:
        self._stopped = True
        self.down()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                n = self.accepted
            if n <= self.reset_first:
                self.resets += 1
                self._reset(conn)
                continue
            limit = self.cut_after if n <= self.reset_first + self.cut_first else None
            threading.Thread(target=self._serve, args=(conn, limit), daemon=True).start()

    def _serve(self, conn: socket.socket, limit: int | None) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            self._reset(conn)
            return

        def pump(src: socket.socket, dst: socket.socket, budget: int | None) -> None:
            sent = 0
            try:
                while data := src.recv(65536):
                    if budget is not None and sent + len(data) > budget:
                        with self._lock:
                            self.cuts += 1
                        self._reset(src)
                        dst.close()
                        return
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn, None), daemon=True).start()
        pump(conn, upstream, limit)


@pytest.fixture
def proxy_factory(s3):
    upstream = urlparse(s3.endpoint)
    proxies: list[FlakyProxy] = []

    def make(**kwargs) -> FlakyProxy:
        proxies.append(FlakyProxy((upstream.hostname, upstream.port), **kwargs))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}',
        "nested/deeper/rng_state_0.pth": os.urandom(70_000),
        "big.safetensors": os.urandom(12 * MB),  # 3 multipart parts with SMALL_PARTS
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def assert_same_tree(root: Path, files: dict[str, bytes]) -> None:
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got.keys() == files.keys()
    for rel, data in files.items():
        assert hashlib.sha256(got[rel]).digest() == hashlib.sha256(data).digest(), rel


def test_upload_dir_and_download_prefix_round_trip(s3, s3_bucket: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    client = s3_client_from_env(env=s3.env())
    uploaded: list[str] = []
    dest = S3Uri.parse(f"s3://{s3_bucket}/runs/one")
    entries = upload_dir(
        tmp_path / "src",
        dest,
        client=client,
        config=SMALL_PARTS,
        on_uploaded=lambda u: uploaded.append(u.key),
    )
    assert sorted(e.path for e in entries) == sorted(files)
    by_path = {e.path: e for e in entries}
    assert by_path["big.safetensors"].size == 12 * MB
    assert by_path["config.json"].sha256 == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert sorted(uploaded) == sorted(f"runs/one/{p}" for p in files)
    # The big file really went up in parts (a multipart ETag ends with -<parts>).
    etag = client.head_object(Bucket=s3_bucket, Key="runs/one/big.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")

    paths = download_prefix(
        f"s3://{s3_bucket}/runs/one/", tmp_path / "dst", client=client, config=SMALL_PARTS
    )
    assert len(paths) == len(files)
    assert_same_tree(tmp_path / "dst", files)


def test_upload_survives_reset_connections_and_cut_uploads(
    s3, s3_bucket: str, tmp_path: Path, proxy_factory
) -> None:
    files = make_tree(tmp_path / "src")
    proxy = proxy_factory(reset_first=4, cut_first=3, cut_after=256 * 1024)
    client = s3_client_from_env(env={**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint})
    upload_dir(
        tmp_path / "src", f"s3://{s3_bucket}/flaky", client=client, config=SMALL_PARTS, policy=FAST_RETRY
    )
    assert proxy.resets == 4
    assert proxy.cuts >= 1  # at least one upload body was cut mid-way and sent again
    download_prefix(f"s3://{s3_bucket}/flaky", tmp_path / "dst", client=s3_client_from_env(env=s3.env()))
    assert_same_tree(tmp_path / "dst", files)


def test_whole_file_retry_outlasts_an_endpoint_outage(
    s3, s3_bucket: str, tmp_path: Path, proxy_factory
) -> None:
    """botocore gives up after 2 tries; kubetune's backoff rounds carry the upload over a 2 s outage."""
    files = make_tree(tmp_path / "src")
    proxy = proxy_factory()
    env = {**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "2"}
    client = s3_client_from_env(env=env)

    # Without the outer retry, the outage is fatal ...
    proxy.down()
    with pytest.raises(TransferError, match="still failing after 1 attempts"):
        upload_dir(tmp_path / "src", f"s3://{s3_bucket}/x", client=client, policy=RetryPolicy(attempts=1))

    # ... with it, the upload completes once the endpoint is back.
    threading.Timer(2.0, proxy.up).start()
    started = time.monotonic()
    upload_dir(
        tmp_path / "src", f"s3://{s3_bucket}/outage", client=client, config=SMALL_PARTS, policy=FAST_RETRY
    )
    assert time.monotonic() - started >= 1.5
    download_prefix(f"s3://{s3_bucket}/outage", tmp_path / "dst", client=s3_client_from_env(env=s3.env()))
    assert_same_tree(tmp_path / "dst", files)


def test_fatal_errors_fail_fast_with_a_clear_message(s3, s3_bucket: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    client = s3_client_from_env(env=s3.env())
    started = time.monotonic()
    # (SeaweedFS creates buckets on PUT, so the missing bucket shows on a download.)
    with pytest.raises(TransferError, match=r"NoSuchBucket .*not retried: check the bucket name"):
        download_prefix("s3://no-such-bucket-kt/x/", tmp_path / "dst", client=client, policy=FAST_RETRY)
    bad_key = s3_client_from_env(env={**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    with pytest.raises(TransferError, match="not retried"):
        upload_dir(tmp_path / "src", f"s3://{s3_bucket}/x", client=bad_key, policy=FAST_RETRY)
    assert time.monotonic() - started < 10
    with pytest.raises(TransferError, match="is not a directory"):
        upload_dir(tmp_path / "missing", f"s3://{s3_bucket}/x", client=client)
    with pytest.raises(TransferError, match="no objects under"):
        download_prefix(f"s3://{s3_bucket}/nothing-here/", tmp_path / "dst", client=client)


@pytest.mark.parametrize("rel", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./x", ""])
def test_download_refuses_relative_paths_that_escape_the_directory(tmp_path: Path, rel: str) -> None:
    # SeaweedFS itself refuses such keys, other servers may not: the check is local.
    from kubetune_trainer.storage.transfer import _safe_local_path

    with pytest.raises(TransferError, match="not a safe file name"):
        _safe_local_path(tmp_path, rel, f"s3://b/{rel}")
    assert _safe_local_path(tmp_path, "a/b.txt", "s3://b/a/b.txt") == tmp_path / "a" / "b.txt"
