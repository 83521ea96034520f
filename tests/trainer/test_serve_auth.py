"""API keys and adapter-route limits against the real server over HTTP (openai client and httpx)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.serve import ModelServer, RunningServer
from kubetune_trainer.serve.adapter_sync import AdapterSync, ServerClient, api_key_from_env
from kubetune_trainer.serve.auth import Access, matches, parse_keys
from kubetune_trainer.serve.cli import main
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models
from tests.trainer.test_serve_adapter_sync import ConfigMapVolume, _adapter_set
from tests.trainer.test_serve_http import wait_ready

__all__ = ["serve_models"]
USER_KEYS = ("sk-user-one-4f1d9a", "sk-user-two-77c0e2")
ADMIN_KEY = "sk-admin-a81b33"


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def openai_client(run: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{run.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def secured(
    serve_models: ServeModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, ConfigMapVolume, Path]]:
    """A server with two API keys and an admin key, from kubelet-style Secret mounts."""
    root = tmp_path_factory.mktemp("auth")
    keys = ConfigMapVolume(root / "keys", file="api-keys")
    keys.write("# clients\n" + "\n".join(USER_KEYS) + "\n\n")
    admin = ConfigMapVolume(root / "admin", file="admin-key")
    admin.write(ADMIN_KEY + "\n")
    allowed = root / "adapters"
    allowed.mkdir()
    server = ModelServer(
        base_model=str(serve_models.base),
        base_model_name="tiny",
        adapters={"red": str(serve_models.adapters["red"])},
        api_key_file=str(keys.path),
        admin_key_file=str(admin.path),
        adapter_roots=[str(allowed)],
    )
    with server.start_background() as run:
        wait_ready(run.url)
        yield run, keys, allowed


def test_every_v1_route_needs_a_key(secured, serve_models: ServeModels) -> None:
    run, _, _ = secured
    with httpx.Client(base_url=run.url, timeout=60) as h:
        body = {"model": "red", "prompt": "x ->", "max_tokens": 4, "temperature": 0}
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/models/red"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/load_lora_adapter"),
            ("POST", "/v1/unload_lora_adapter"),
            ("GET", "/v1/no-such-route"),
        ]:
            r = h.request(method, path, json=body)
            err = error_of(r, 401)
            assert err["code"] == "missing_api_key" and "Authorization: Bearer" in err["message"], path
            assert r.headers["www-authenticate"] == "Bearer"
        # Not a bearer token, or an empty one: the same refusal.
        assert error_of(h.get("/v1/models", headers={"Authorization": f"Basic {USER_KEYS[0]}"}), 401)
        assert error_of(h.get("/v1/models", headers={"Authorization": "Bearer"}), 401)
        # Probes and Prometheus stay open.
        assert h.get("/health").status_code == 200
        assert h.get("/ready").status_code == 200
        assert h.get("/metrics").status_code == 200


def test_the_openai_client_with_wrong_and_right_keys(secured) -> None:
    run, _, _ = secured
    with pytest.raises(openai.AuthenticationError) as exc:
        openai_client(run, "sk-wrong").models.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    # A key that is a prefix of a real one is still wrong.
    with pytest.raises(openai.AuthenticationError):
        openai_client(run, USER_KEYS[0][:-1]).completions.create(model="red", prompt="x", max_tokens=2)
    for key in (*USER_KEYS, ADMIN_KEY):  # every configured key works
        client = openai_client(run, key)
        assert {m.id for m in client.models.list().data} == {"tiny", "red"}
        out = client.completions.create(model="red", prompt="x ->", max_tokens=16, temperature=0)
        assert out.choices[0].text == PHRASES["red"]
        chat = client.chat.completions.create(
            model="red", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert chat.choices[0].message.role == "assistant"


def test_adapter_routes_need_an_admin_key(secured, serve_models: ServeModels) -> None:
    run, _, allowed = secured
    import shutil

    path = shutil.copytree(serve_models.adapters["num"], allowed / "num")
    body = {"lora_name": "num", "lora_path": str(path)}
    with httpx.Client(base_url=run.url, timeout=60) as h:
        assert error_of(h.post("/v1/load_lora_adapter", json=body), 401)["code"] == "missing_api_key"
        wrong = {"Authorization": "Bearer sk-wrong"}
        assert error_of(h.post("/v1/load_lora_adapter", json=body, headers=wrong), 401)
        user = {"Authorization": f"Bearer {USER_KEYS[0]}"}
        refused = error_of(h.post("/v1/load_lora_adapter", json=body, headers=user), 403)
        assert refused["code"] == "admin_key_required" and "admin key" in refused["message"]
        unload = {"lora_name": "red"}
        assert error_of(h.post("/v1/unload_lora_adapter", json=unload, headers=user), 403)
        assert error_of(h.post("/v1/unload_lora_adapter", json=unload), 401)
        assert "num" not in {m["id"] for m in h.get("/v1/models", headers=user).json()["data"]}

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = h.post("/v1/load_lora_adapter", json=body, headers=admin)
        assert r.status_code == 200, r.text
        answer = openai_client(run, USER_KEYS[1]).completions.create(
            model="num", prompt="x ->", max_tokens=16, temperature=0
        )
        assert answer.choices[0].text == PHRASES["num"]
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "num"}, headers=admin).status_code == 200
        assert "red" in {m["id"] for m in h.get("/v1/models", headers=user).json()["data"]}  # untouched


def test_adapter_paths_are_limited_to_the_allowed_roots(secured, serve_models: ServeModels) -> None:
    run, _, allowed = secured
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    (allowed / "link").symlink_to(serve_models.adapters["red"])  # points out of the root
    outside = [
        str(serve_models.adapters["red"]),  # a real adapter, outside every root
        f"{allowed}/../../{serve_models.adapters['red'].relative_to(allowed.parent.parent)}",
        str(allowed / "link"),
        f"file://{serve_models.adapters['red']}",
        "/etc",
        "s3://other-bucket/adapters/red",
    ]
    with httpx.Client(base_url=run.url, timeout=60, headers=admin) as h:
        for path in outside:
            err = error_of(h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 403)
            assert err["code"] == "path_not_allowed" and err["param"] == "lora_path", path
            assert "adapter_roots" in err["message"] and str(allowed) in err["message"]
        bad = error_of(h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "hf://o/m"}), 400)
        assert "unsupported scheme" in bad["message"]
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {"tiny", "red"}


def test_keys_rotate_without_a_restart_and_are_never_logged(
    secured, caplog: pytest.LogCaptureFixture
) -> None:
    run, keys, _ = secured
    caplog.set_level(logging.DEBUG)
    # The package's own level too: an in-process quickstart earlier in the session set it to WARNING.
    caplog.set_level(logging.DEBUG, logger="kubetune_trainer")
    try:
        keys.write("sk-rotated-91aa\n")  # the kubelet swaps the Secret mount's ..data symlink
        with httpx.Client(base_url=run.url, timeout=60) as h:
            old = {"Authorization": f"Bearer {USER_KEYS[0]}"}
            assert error_of(h.get("/v1/models", headers=old), 401)["code"] == "invalid_api_key"
            assert h.get("/v1/models", headers={"Authorization": "Bearer sk-rotated-91aa"}).status_code == 200
            # An emptied file (a rotation caught half way) keeps the last keys instead of locking out.
            keys.write("\n")
            assert h.get("/v1/models", headers={"Authorization": "Bearer sk-rotated-91aa"}).status_code == 200
    finally:
        keys.write("\n".join(USER_KEYS) + "\n")
    assert "key(s) loaded" in caplog.text
    for secret in (*USER_KEYS, ADMIN_KEY, "sk-rotated-91aa", "sk-wrong"):
        assert secret not in caplog.text


def test_adapter_sync_sends_the_admin_key(
    secured, serve_models: ServeModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sidecar's key comes from KUBETUNE_SERVER_API_KEY (a secretKeyRef), trailing newline and all."""
    run, _, allowed = secured
    adapter_set = tmp_path / "adapters.json"
    adapter_set.write_text(_adapter_set({"red": str(serve_models.adapters["red"])}))

    def sync_once(key: str | None) -> dict:
        server = ServerClient(run.url, api_key=key)
        try:
            sync = AdapterSync(adapter_set, server, allowed, interval=0.1)
            sync.step()
            import json

            return json.loads(sync.status_file.read_text())
        finally:
            server.close()

    assert sync_once(None)["phase"] == "WaitingForServer"  # /v1/models answers 401
    monkeypatch.setenv("KUBETUNE_SERVER_API_KEY", USER_KEYS[0] + "\n")
    user = sync_once(api_key_from_env())  # may list, may not load
    assert user["phase"] == "InSync"  # red is configured: nothing to load
    adapter_set.write_text(_adapter_set({"red2": str(serve_models.adapters["red"])}))
    user = sync_once(api_key_from_env())
    assert user["phase"] == "Syncing" and "admin key" in user["adapters"]["red2"]["error"]
    monkeypatch.setenv("KUBETUNE_SERVER_API_KEY", ADMIN_KEY + "\n")
    assert api_key_from_env() == ADMIN_KEY
    assert sync_once(api_key_from_env())["phase"] == "InSync"  # red unloaded, red2 loaded from its copy
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    models = {m["id"]: m for m in httpx.get(f"{run.url}/v1/models", headers=admin).json()["data"]}
    assert set(models) == {"tiny", "red2"} and models["red2"]["root"].startswith(str(allowed))
    # Put the module's server back as the other tests expect it.
    adapter_set.write_text(_adapter_set({"red": str(serve_models.adapters["red"])}))
    assert sync_once(ADMIN_KEY)["phase"] == "InSync"


# ----------------------------------------------------------------------------- defaults


def test_without_configuration_the_adapter_routes_are_off(serve_models: ServeModels) -> None:
    server = ModelServer(base_model=str(serve_models.base), base_model_name="tiny")
    body = {"lora_name": "red", "lora_path": str(serve_models.adapters["red"])}
    with server.start_background() as run, httpx.Client(base_url=run.url, timeout=60) as h:
        wait_ready(run.url)
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            err = error_of(h.post(path, json=body), 403)
            assert err["code"] == "adapter_updates_disabled" and "--runtime-adapter-updates" in err["message"]
        with pytest.raises(openai.PermissionDeniedError):
            openai_client(run, "anything").post("/load_lora_adapter", body=body, cast_to=httpx.Response)
        # Inference stays open (no key configured), as before.
        assert h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {"tiny"}


def test_runtime_updates_with_api_keys_only(serve_models: ServeModels, tmp_path: Path) -> None:
    """Hot reload without an admin key file: any API key may load, nobody without one."""
    (tmp_path / "keys").write_text(USER_KEYS[0])
    server = ModelServer(
        base_model=str(serve_models.base),
        api_key_file=str(tmp_path / "keys"),
        runtime_adapter_updates=True,
        adapter_roots=[str(serve_models.adapters["red"].parent)],
    )
    body = {"lora_name": "red", "lora_path": str(serve_models.adapters["red"])}
    with server.start_background() as run, httpx.Client(base_url=run.url, timeout=60) as h:
        assert error_of(h.post("/v1/load_lora_adapter", json=body), 401)
        ok = h.post("/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {USER_KEYS[0]}"})
        assert ok.status_code == 200, ok.text


def test_bad_key_files_are_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"api_key_file .*missing.*mount the Secret"):
        ModelServer(base_model="x", api_key_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match=r"admin_key_file .*empty holds no key"):
        ModelServer(base_model="x", admin_key_file=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"adapter_roots: 'hf://x' is not a directory"):
        ModelServer(base_model="x", adapter_roots=["hf://x"])
    code = main(["serve", "--base-model", "x", "--api-key-file", str(tmp_path / "missing")])
    assert code == 2
    assert "api_key_file" in capsys.readouterr().err


def test_key_parsing_and_constant_time_matching() -> None:
    keys = parse_keys("  a1 \n# comment\n\nb2\r\n")
    assert keys == [b"a1", b"b2"]
    assert matches(b"b2", keys) and matches(b"a1", keys)
    assert not matches(b"a", keys) and not matches(b"b2 ", keys) and not matches(b"", keys)


def test_an_unauthenticated_caller_learns_nothing_but_401(tmp_path: Path) -> None:
    """The key is checked before anything else: without one, disabled routes also answer 401."""
    (tmp_path / "keys").write_text("sk-1\n")
    access = Access(str(tmp_path / "keys"), None, runtime_adapter_updates=False)
    assert access.check("/v1/load_lora_adapter", None)[:2] == (401, "missing_api_key")
    assert access.check("/v1/unload_lora_adapter", "Bearer sk-2")[:2] == (401, "invalid_api_key")
    assert access.check("/v1/load_lora_adapter", "Bearer sk-1")[:2] == (403, "adapter_updates_disabled")
    assert access.check("/v1/completions", "bearer sk-1") is None
    for open_path in ("/health", "/ready", "/metrics"):
        assert access.check(open_path, None) is None


def test_serve_flags_reach_the_config() -> None:
    from kubetune_trainer.serve.cli import build_parser, server_config_from_args

    argv = ["serve", "--base-model", "x", "--api-key-file", "/k/api-keys", "--admin-key-file", "/k/admin"]
    argv += ["--runtime-adapter-updates", "--adapter-root", "/adapters", "--adapter-root", "s3://b/runs"]
    config = server_config_from_args(build_parser().parse_args(argv))
    assert (config.api_key_file, config.admin_key_file) == ("/k/api-keys", "/k/admin")
    assert config.runtime_adapter_updates is True
    assert config.adapter_roots == ["/adapters", "s3://b/runs"]
    plain = server_config_from_args(build_parser().parse_args(["serve", "--base-model", "x"]))
    assert (plain.api_key_file, plain.runtime_adapter_updates, plain.adapter_roots) == (None, False, [])
