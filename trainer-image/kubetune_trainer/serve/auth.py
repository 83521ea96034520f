"""API keys for the HTTP API: who may call the ``/v1`` routes, and who may load or unload adapters.

Keys live in files (a mounted Secret in Kubernetes), one key per line; blank lines and lines
starting with ``#`` are ignored. A file is re-read when it changes (the kubelet swaps a Secret
mount's symlink on rotation), so new keys work without a restart. Two sets:

* API keys (``--api-key-file``): may call every ``/v1`` route except adapter loading;
* admin keys (``--admin-key-file``): may also call ``/v1/load_lora_adapter`` and
  ``/v1/unload_lora_adapter``.

Without an admin key file, the load/unload routes are off unless runtime adapter updates are
enabled (``--runtime-adapter-updates``, what hot reload sets); then any API key may use them.
``/health``, ``/ready`` and ``/metrics`` stay open for probes and Prometheus. Keys are compared
in constant time against every configured key and never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from kubetune_trainer.exit_codes import ConfigError

log = logging.getLogger(__name__)

ADAPTER_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
PROTECTED_PREFIX = "/v1"


def parse_keys(text: str) -> list[bytes]:
    return [
        line.strip().encode()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


class KeyFile:
    """The keys in one file, re-read when the file changes (Secret rotation)."""

    def __init__(self, path: str | os.PathLike[str], what: str):
        self.path = Path(path)
        self.what = what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[bytes] = []
        if not self._reload():
            raise ConfigError(f"{what} {self.path}: cannot read it: mount the Secret or fix the path")
        if not self._keys:
            raise ConfigError(f"{what} {self.path} holds no key: write one key per line")

    def _reload(self) -> bool:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp == self._stamp:
                return True
            keys = parse_keys(self.path.read_text())
        except (OSError, UnicodeDecodeError):
            return False
        if keys:
            self._keys, self._stamp = keys, stamp
            log.info("%s %s: %d key(s) loaded", self.what, self.path, len(keys))
        else:  # a file emptied mid-rotation: keep the keys that worked rather than lock everyone out
            log.warning("%s %s holds no key now: keeping the previous keys", self.what, self.path)
        return True

    def keys(self) -> list[bytes]:
        with self._lock:
            if not self._reload():
                log.warning("%s %s cannot be read now: keeping the previous keys", self.what, self.path)
            return self._keys


def matches(token: bytes, keys: list[bytes]) -> bool:
    """Constant-time membership: every key is compared, whatever matched first."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class Access:
    """Decides each request: allowed, or the OpenAI-style error to answer."""

    def __init__(
        self,
        api_key_file: str | None,
        admin_key_file: str | None,
        runtime_adapter_updates: bool,
    ):
        self.api = KeyFile(api_key_file, "api_key_file") if api_key_file else None
        self.admin = KeyFile(admin_key_file, "admin_key_file") if admin_key_file else None
        self.adapter_routes_on = runtime_adapter_updates or self.admin is not None

    @property
    def keys_required(self) -> bool:
        return self.api is not None or self.admin is not None

    def describe(self) -> str:
        auth = "API keys required on /v1" if self.keys_required else "no API key required (open)"
        if not self.adapter_routes_on:
            routes = "off"
        elif self.admin is not None:
            routes = "admin keys only"
        else:
            routes = "any API key" if self.keys_required else "open to anyone"
        return f"{auth}; adapter load/unload: {routes}"

    def check(self, path: str, authorization: str | None) -> tuple[int, str, str] | None:
        """None when the request may go on, else (status, code, message)."""
        if not path.startswith(PROTECTED_PREFIX):
            return None
        admin_route = path.rstrip("/") in ADAPTER_ROUTES
        if self.keys_required:  # who may know more than "401" is decided first
            refusal = self._check_key(authorization, admin_route)
            if refusal is not None:
                return refusal
        if admin_route and not self.adapter_routes_on:
            return (
                403,
                "adapter_updates_disabled",
                "Loading and unloading adapters is turned off on this server: start it with "
                "--runtime-adapter-updates (AdapterDeployment spec.hotReload) or --admin-key-file",
            )
        return None

    def _check_key(self, authorization: str | None, admin_route: bool) -> tuple[int, str, str] | None:
        token = _bearer(authorization)
        if token is None:
            return (
                401,
                "missing_api_key",
                "You didn't provide an API key. Send it in the Authorization header: "
                "'Authorization: Bearer YOUR_KEY' (the openai client's api_key)",
            )
        admin_ok = self.admin is not None and matches(token, self.admin.keys())
        api_ok = self.api is not None and matches(token, self.api.keys())
        if not (admin_ok or api_ok):
            return 401, "invalid_api_key", "Incorrect API key provided: use a key from the server's key file"
        if admin_route and self.admin is not None and not admin_ok:
            return (
                403,
                "admin_key_required",
                "This key may not load or unload adapters: use an admin key (admin_key_file)",
            )
        return None


def _bearer(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode()


class AuthMiddleware:
    """Pure ASGI middleware (streams pass through untouched): answers refused requests itself."""

    def __init__(self, app: Any, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None
        )
        refusal = self.access.check(scope.get("path", ""), header)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        kind = "authentication_error" if status == 401 else "permission_error"
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
