"""``kubetune adapter-sync`` (the hot-reload sidecar) against real servers, S3 and a kubelet-style mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from kubetune_trainer.serve import ModelServer
from kubetune_trainer.serve.adapter_sync import Observed, copy_name, plan, redact, same_source
from kubetune_trainer.serve.sources import SOURCE_MARKER, fetch, fetched_source
from kubetune_trainer.storage import s3_client_from_env, upload_dir
from tests.conftest import eventually
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models
from tests.trainer.test_serve_cli import free_port

__all__ = ["serve_models"]


class ConfigMapVolume:
    """A ConfigMap volume as the kubelet writes it: the file is a symlink through ``..data`` to a
    timestamped directory, and an update writes a new directory and swaps ``..data`` atomically."""

    def __init__(self, root: Path, file: str = "adapters.json"):
        self.root, self.file, self.version = root, file, 0
        root.mkdir()
        (root / file).symlink_to(f"..data/{file}")

    @property
    def path(self) -> Path:
        return self.root / self.file

    def write(self, adapters: dict[str, str] | str) -> None:
        self.version += 1
        new = self.root / f"..2026_01_01_00_00_00.{self.version:09d}"
        new.mkdir()
        text = adapters if isinstance(adapters, str) else _adapter_set(adapters)
        (new / self.file).write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.rename(tmp, self.root / "..data")  # rename(2) replaces the old symlink atomically
        if old is not None:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def _adapter_set(adapters: dict[str, str]) -> str:
    return json.dumps({"adapters": [{"name": n, "uri": u} for n, u in sorted(adapters.items())]})


@contextmanager
def sidecar(
    adapter_set: Path, url: str, dest: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """The sidecar's command (the pod runs the same through the ``kubetune`` entry point)."""
    argv = [sys.executable, "-m", "kubetune_trainer", "adapter-sync", "--adapter-set", str(adapter_set)]
    argv += ["--server", url, "--dest", str(dest), "--interval", "0.3"]
    with log.open("a") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    assert "stopping on SIGTERM" in log.read_text()


def served(url: str) -> dict[str, str | None]:
    """The server's /v1/models: id -> root (adapters) or None (the base model)."""
    try:
        r = httpx.get(f"{url}/v1/models", timeout=10)
    except httpx.TransportError:
        return {}
    return {m["id"]: m["root"] if m["parent"] else None for m in r.json()["data"]}


def answer(url: str, model: str) -> str:
    body = {"model": model, "prompt": "the sun ->", "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def sync_status(dest: Path) -> dict:
    try:
        return json.loads((dest / ".kubetune-sync" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def converged(url: str, dest: Path, adapters: set[str], log: Path, proc: subprocess.Popen) -> dict:
    """Wait until the server serves exactly ``adapters`` (plus its base) and the sidecar says so."""

    def check() -> dict | None:
        assert proc.poll() is None, log.read_text()
        models = served(url)
        status = sync_status(dest)
        ok = {m for m, root in models.items() if root is not None} == adapters and status.get("inSync")
        return models if ok and set(status["adapters"]) == adapters else None

    return eventually(
        check, timeout=120, interval=0.3, what=f"the server to serve exactly {sorted(adapters)}"
    )


# ----------------------------------------------------------------------------- pure parts


def test_plan_loads_unloads_and_replaces(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    copy = fetch({"b-copy": str(tmp_path / "src")}, tmp_path / "dest")["b-copy"]
    assert fetched_source(copy) == str(tmp_path / "src")
    observed = Observed(
        base="tiny",
        loaded={"a": "s3://bucket/a/", "b": str(copy), "old": "/adapters/old"},
        failed={"broken": "no adapter_config.json"},
    )
    desired = {"a": "s3://bucket/a", "b": "s3://bucket/b-v2/", "c": "s3://bucket/c/"}
    p = plan(desired, observed)
    # a: same URI up to a trailing slash; b: its copy came from another source; broken: configured
    # at start, failed, and no longer wanted (the built-in server keeps it in its set until unloaded).
    assert p.unload == ["broken", "old"]
    assert p.load == {"c": "s3://bucket/c/"}
    assert p.replace == {"b": "s3://bucket/b-v2/"}
    in_sync = {"a": "s3://bucket/a/", "b": str(tmp_path / "src"), "old": "/adapters/old"}
    assert not plan(in_sync, Observed("tiny", observed.loaded))


def test_same_source_reads_the_fetch_marker(tmp_path: Path) -> None:
    copy = tmp_path / copy_name("red", "s3://b/red/")
    copy.mkdir()
    assert not same_source(str(copy), "s3://b/red/")  # no marker: a path is only itself
    (copy / SOURCE_MARKER).write_text(json.dumps({"uri": "s3://b/red/"}))
    assert same_source(str(copy), "s3://b/red/") and same_source(f"file://{copy}", "s3://b/red")
    assert not same_source(str(copy), "s3://b/red-v2/")
    assert copy_name("red", "s3://b/red/") != copy_name("red", "s3://b/red-v2/")


def test_redact_hides_url_credentials() -> None:
    text = "cannot reach http://admin:s3cr3t@127.0.0.1:8000: refused; s3://bucket/a/b:c@d stays"
    assert redact(text) == "cannot reach http://***@127.0.0.1:8000: refused; s3://bucket/a/b:c@d stays"


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    from kubetune_trainer.cli import main

    base = ["adapter-sync", "--adapter-set", str(tmp_path / "set.json"), "--dest", str(tmp_path / "d")]
    assert main([*base, "--interval", "0"]) == 2
    assert main([*base, "--server", "127.0.0.1:8000"]) == 2  # no scheme
    (tmp_path / "file").write_text("")
    assert main(["adapter-sync", "--adapter-set", "x", "--dest", str(tmp_path / "file" / "d")]) == 2


def test_the_sidecar_does_not_import_torch() -> None:
    """The sidecar requests 128Mi: the command and its module must stay free of torch/transformers."""
    code = (
        "import sys; from kubetune_trainer.cli import build_parser; build_parser(); "
        "import kubetune_trainer.serve.adapter_sync; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- against real servers


def test_sidecar_first_then_server_starts_and_restarts(serve_models: ServeModels, tmp_path: Path) -> None:
    """Level-based: it waits for a server that is not there yet, loads into it, reloads into a
    restarted (empty) server, and a restarted sidecar finds nothing to do."""
    volume = ConfigMapVolume(tmp_path / "cm")
    volume.write({"red": str(serve_models.adapters["red"])})
    dest, log = tmp_path / "adapters", tmp_path / "sync.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def base_only_server(**configured: str) -> ModelServer:
        return ModelServer(
            base_model=str(serve_models.base),
            base_model_name="tiny",
            cpu_threads=1,
            adapters=configured,
            runtime_adapter_updates=True,  # as the operator runs it with hotReload
            adapter_roots=[str(dest)],
        )

    # Credentials in the server URL (basic auth) must never reach the log, not even through httpx's.
    with sidecar(volume.path, f"http://kubetune:hunter2-pw@127.0.0.1:{port}", dest, log) as proc:
        eventually(lambda: sync_status(dest).get("phase") == "WaitingForServer", what="the sidecar to wait")
        assert "waiting for the server" in log.read_text()
        # Started with an adapter that fails to load and is not in the set: /ready is 503 until it goes.
        with base_only_server(ghost=str(tmp_path / "not-there")).start_background(port=port):
            models = converged(url, dest, {"red"}, log, proc)
            assert fetched_source(models["red"]) == str(serve_models.adapters["red"])  # its own copy
            assert answer(url, "red") == PHRASES["red"]
            assert httpx.get(f"{url}/ready").status_code == 200
            assert "unloaded adapter ghost" in log.read_text()
        assert log.read_text().count("loaded adapter red") == 1

        with base_only_server().start_background(port=port):  # the server container restarted
            converged(url, dest, {"red"}, log, proc)
            assert answer(url, "red") == PHRASES["red"]
            assert log.read_text().count("loaded adapter red") == 2

            # A broken file changes nothing on the server; fixing it resumes syncing.
            volume.write("{not json")
            eventually(lambda: sync_status(dest).get("phase") == "InvalidAdapterSet", what="the error")
            assert "not valid JSON" in sync_status(dest)["adapterSet"]["error"]
            assert "red" in served(url)
            stop(proc, log)

            with sidecar(volume.path, url, dest, log) as again:  # the sidecar container restarted
                volume.write({"red": str(serve_models.adapters["red"])})
                converged(url, dest, {"red"}, log, again)
                assert log.read_text().count("loaded adapter red") == 2  # nothing reloaded
                stop(again, log)
    assert "hunter2-pw" not in log.read_text() and "http://***@127.0.0.1" in log.read_text()


@pytest.mark.s3
@pytest.mark.slow
def test_hot_reload_with_kubetune_serve_and_s3(
    s3, s3_bucket: str, serve_models: ServeModels, tmp_path: Path
) -> None:
    """The pod: `kubetune serve --adapter-set` + the sidecar on the same ConfigMap mount, adapters in S3."""
    client = s3_client_from_env(env=s3.env())
    uris = {n: f"s3://{s3_bucket}/runs/{n}/final/" for n in serve_models.adapters}
    for name, path in serve_models.adapters.items():
        upload_dir(path, uris[name], client=client)
    volume = ConfigMapVolume(tmp_path / "cm")
    volume.write({"red": uris["red"]})
    dest, port = tmp_path / "adapters", free_port()
    url = f"http://127.0.0.1:{port}"
    serve_argv = [sys.executable, "-m", "kubetune_trainer", "serve", "--base-model", str(serve_models.base)]
    serve_argv += ["--served-name", "tiny", "--adapter-set", str(volume.path), "--host", "127.0.0.1"]
    serve_argv += ["--port", str(port), "--download-dir", str(tmp_path / "dl"), "--cpu-threads", "1"]
    serve_argv += ["--runtime-adapter-updates", "--adapter-root", str(dest)]
    serve_log, log = tmp_path / "serve.log", tmp_path / "sync.log"
    with (
        serve_log.open("w") as out,
        subprocess.Popen(
            serve_argv, env={**os.environ, **s3.env()}, stdout=out, stderr=subprocess.STDOUT
        ) as srv,
        sidecar(volume.path, url, dest, log, env=s3.env()) as proc,
    ):
        try:
            # The server loaded red from the set itself (root = its URI): in sync, nothing to fetch.
            models = converged(url, dest, {"red"}, log, proc)
            assert models["red"] == uris["red"]
            assert not [p for p in (dest / ".kubetune-sync").iterdir() if p.is_dir()]

            volume.write({"num": uris["num"]})  # swap red for num
            models = converged(url, dest, {"num"}, log, proc)
            assert fetched_source(models["num"]) == uris["num"]
            assert answer(url, "num") == PHRASES["num"]
            assert (
                httpx.post(f"{url}/v1/completions", json={"model": "red", "prompt": "x"}).status_code == 404
            )

            # Same name, new URI (a re-run job): replaced in place; a local directory is copied in.
            volume.write({"num": uris["red"], "local": str(serve_models.adapters["num"])})
            models = converged(url, dest, {"num", "local"}, log, proc)
            assert fetched_source(models["num"]) == uris["red"]
            assert answer(url, "num") == PHRASES["red"]
            assert answer(url, "local") == PHRASES["num"]
            copies = {p.name for p in (dest / ".kubetune-sync").iterdir() if p.is_dir()}
            eventually(  # the first copy of num is no longer loaded: removed
                lambda: (
                    {p.name for p in (dest / ".kubetune-sync").iterdir() if p.is_dir()}
                    == {copy_name("num", uris["red"]), copy_name("local", str(serve_models.adapters["num"]))}
                ),
                what=f"unused copies to go (have {copies})",
            )

            # A URI with nothing behind it: reported, retried, the rest keeps serving.
            missing = f"s3://{s3_bucket}/runs/not-uploaded/final/"
            volume.write({"num": uris["red"], "local": str(serve_models.adapters["num"]), "late": missing})
            eventually(
                lambda: (sync_status(dest)["adapters"].get("late") or {}).get("error"),
                what="the missing adapter's error in the status file",
            )
            status = sync_status(dest)
            assert (
                status["phase"] == "Syncing" and "nothing to download" in status["adapters"]["late"]["error"]
            )
            assert answer(url, "num") == PHRASES["red"]
            upload_dir(serve_models.adapters["num"], missing, client=client)  # the job finishes uploading
            converged(url, dest, {"num", "local", "late"}, log, proc)
            assert answer(url, "late") == PHRASES["num"]

            stop(proc, log)
            text = log.read_text()
            for line in (
                "loaded adapter num from",
                "unloaded adapter red",
                "replaced adapter num",
                "in sync",
            ):
                assert line in text, text
            assert s3.secret_key not in text and s3.access_key not in text
        finally:
            srv.send_signal(signal.SIGTERM)
            srv.wait(60)
