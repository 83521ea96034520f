"""``kubetune adapter-sync``: keep a running server's LoRA adapters equal to an adapter-set file.

The AdapterDeployment's hot-reload sidecar (operator: adapterdeployment/builders.py) runs::

    kubetune adapter-sync --adapter-set /etc/kubetune/adapters.json \
        --server http://127.0.0.1:8000 --dest /adapters

Level-based: every pass reads the desired set (the ConfigMap file, ``{"adapters": [{"name",
"uri"}]}``) and what the server has loaded (``GET /v1/models``), then converges with vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, which the built-in server speaks too.
Nothing that matters is remembered between passes, so a restarted server (back with its start-up
set) or a restarted sidecar (back to a loaded server) converges the same way. Passes run every
``--interval`` seconds whether or not the file changed: the kubelet updates a ConfigMap mount by
swapping a symlink, which an inotify watch on the file does not see.

Adapters are fetched (``sources.fetch``: s3:// downloads, local directories copied) into
``DEST/.kubetune-sync/NAME-HASH`` before the load request, so the server loads a plain directory
(vLLM needs one). ``/v1/models`` reports each adapter's ``root`` (the path or URI it was loaded
from); the source marker that ``fetch`` leaves in each directory maps a path back to its URI, so a
changed URI under the same name is seen and reloaded in place. Copies no longer loaded are removed.

State for humans and tools: one log line per action or change, and a JSON status file
(``DEST/.kubetune-sync/status.json`` by default; see docs/serving.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from kubetune_trainer.exit_codes import ConfigError

from .config import load_adapter_set
from .sources import SourceError, fetch, fetched_source, is_s3, local_path

log = logging.getLogger("kubetune.adapter_sync")

SYNC_DIR = ".kubetune-sync"
STATUS_FILE = "status.json"
API_KEY_ENVS = ("KUBETUNE_SERVER_API_KEY", "VLLM_API_KEY")  # vLLM --api-key servers need a bearer token
MAX_SERVER_BACKOFF = 10.0  # seconds between tries while the server is down or loading
MAX_ADAPTER_BACKOFF = 60.0  # seconds between tries of an adapter that failed (a URI not uploaded yet ...)
LOAD_TIMEOUT = 600.0  # a load reads the weights (and on GPUs copies them): allow large adapters


def redact(text: str) -> str:
    """Hide ``user:password@`` in URLs; adapter URIs and server URLs are the only URLs logged."""
    return re.sub(r"(://)[^/@\s:]+:[^/@\s]*@", r"\1***@", text)


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def loaded_from(root: str) -> str:
    """The URI an adapter the server lists with ``root`` was loaded from (the fetch marker, if any)."""
    if root and not is_s3(root) and ("://" not in root or root.startswith("file://")):
        uri = fetched_source(local_path(root))
        if uri is not None:
            return uri
    return root


def same_source(root: str, uri: str) -> bool:
    return _norm(root) == _norm(uri) or _norm(loaded_from(root)) == _norm(uri)


def copy_name(name: str, uri: str) -> str:
    """The directory under DEST/.kubetune-sync for ``name`` from ``uri`` (a new URI, a new copy)."""
    return f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class Observed:
    """What the server serves: its base model and each loaded adapter's ``root``."""

    base: str
    loaded: dict[str, str]
    failed: dict[str, str] = field(default_factory=dict)  # built-in server: configured, failed to load


@dataclass(frozen=True)
class Plan:
    unload: list[str]
    load: dict[str, str]  # not loaded yet: name -> uri
    replace: dict[str, str]  # loaded from another source: name -> the new uri

    def __bool__(self) -> bool:
        return bool(self.unload or self.load or self.replace)


def plan(desired: dict[str, str], observed: Observed) -> Plan:
    """The requests that turn ``observed`` into ``desired``. Unloads go first (they free memory)."""
    return Plan(
        unload=sorted(n for n in {*observed.loaded, *observed.failed} if n not in desired),
        load={n: u for n, u in sorted(desired.items()) if n not in observed.loaded},
        replace={
            n: u
            for n, u in sorted(desired.items())
            if n in observed.loaded and not same_source(observed.loaded[n], u)
        },
    )


# --------------------------------------------------------------------------- the server


class ServerUnavailable(Exception):
    """The server cannot take adapter requests yet (not listening, loading, 5xx on /v1/models)."""


class AdapterRequestError(Exception):
    """The server refused a load or unload (the message is the server's)."""


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(body, dict) and body.get("message"):  # vLLM's older error body
        return str(body["message"])
    return r.text.strip()[:500]


class ServerClient:
    """vLLM's adapter endpoints, as both runtimes serve them."""

    def __init__(self, url: str, *, api_key: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: the server is in the same pod; a cluster-wide HTTP(S)_PROXY must not apply.
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0), trust_env=False
        )

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str) -> httpx.Response:
        try:
            return self.http.get(path)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"cannot reach {redact(self.url)}: {exc or type(exc).__name__}") from None

    def observe(self) -> Observed:
        r = self._get("/v1/models")
        if r.status_code != 200:
            raise ServerUnavailable(f"GET /v1/models answered {r.status_code}: {_message(r)}")
        try:
            cards = [m for m in r.json()["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError):
            raise ServerUnavailable("GET /v1/models did not answer an OpenAI model list") from None
        base = next((m["id"] for m in cards if not m.get("parent")), None)
        if base is None:
            raise ServerUnavailable("the server lists no base model yet (still loading)")
        loaded = {m["id"]: str(m.get("root") or "") for m in cards if m.get("parent")}
        return Observed(base=base, loaded=loaded, failed=self._failed_at_start())

    def _failed_at_start(self) -> dict[str, str]:
        """The built-in server's /ready lists configured adapters that are loading or failed.

        Loading ones: wait (a load request now would race the server's own). Failed ones are part
        of its set although /v1/models omits them: they must be unloaded when no longer wanted,
        or /ready stays 503. vLLM has no such endpoint (404): nothing to learn there.
        """
        r = self._get("/ready")
        if r.status_code != 503:
            return {}
        try:
            adapters = r.json().get("adapters")
        except (ValueError, AttributeError):
            return {}
        if not isinstance(adapters, dict):  # not the built-in server's /ready
            return {}
        adapters = {n: a for n, a in adapters.items() if isinstance(a, dict)}
        loading = sorted(n for n, a in adapters.items() if not a.get("loaded") and not a.get("error"))
        if loading:
            raise ServerUnavailable(f"the server is still loading adapters: {', '.join(loading)}")
        return {n: str(a["error"]) for n, a in adapters.items() if not a.get("loaded") and a.get("error")}

    def load(self, name: str, path: str, *, replace: bool) -> None:
        body = {"lora_name": name, "lora_path": path, "load_inplace": replace}
        try:
            r = self.http.post(
                "/v1/load_lora_adapter", json=body, timeout=httpx.Timeout(10.0, read=LOAD_TIMEOUT)
            )
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"load {name}: cannot reach {redact(self.url)}: {exc}") from None
        if r.status_code == 200:
            return
        text = _message(r)
        if replace and "already been loaded" in text:
            # A vLLM without load_inplace: unload, then load (requests for it fail in between).
            log.info("the server cannot replace %s in place: unloading it first", name)
            self.unload(name)
            self.load(name, path, replace=False)
            return
        raise AdapterRequestError(f"POST /v1/load_lora_adapter answered {r.status_code}: {text}")

    def unload(self, name: str) -> None:
        try:
            r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"unload {name}: cannot reach {redact(self.url)}: {exc}") from None
        text = _message(r)
        if r.status_code == 200 or (r.status_code in (400, 404) and "cannot be found" in text):
            return  # gone either way
        raise AdapterRequestError(f"POST /v1/unload_lora_adapter answered {r.status_code}: {text}")


# --------------------------------------------------------------------------- the loop


@dataclass
class _Retry:
    attempts: int
    not_before: float
    error: str


class AdapterSync:
    """One sidecar's reconcile loop; :meth:`step` runs one pass and says when to run the next."""

    def __init__(
        self,
        adapter_set: Path,
        server: ServerClient,
        dest: Path,
        *,
        interval: float = 2.0,
        status_file: Path | None = None,
        s3_client: Any = None,
    ):
        self.adapter_set = adapter_set
        self.server = server
        self.copies = dest / SYNC_DIR
        self.interval = interval
        self.status_file = status_file or self.copies / STATUS_FILE
        self.s3_client = s3_client
        self._retries: dict[tuple[str, str], _Retry] = {}
        self._set_text: str | None = None
        self._set_error: str | None = None
        self._desired: dict[str, str] | None = None
        self._server_error: str | None = None
        self._server_failures = 0
        self._server_up = False
        self._in_sync: bool | None = None
        self._last_synced: str | None = None
        self._status_error: str | None = None

    # ------------------------------------------------------------------ one pass

    def step(self) -> float:
        """Run one pass; returns the seconds to wait before the next."""
        desired = self._read_set()
        if desired is None:
            self._write_status("InvalidAdapterSet", None, None)
            return self.interval
        try:
            observed = self.server.observe()
            self._server_is_up(observed)
            todo = plan(desired, observed)
            acted = bool(todo) and self._apply(todo)
            if acted:
                observed = self.server.observe()
        except ServerUnavailable as exc:
            return self._server_is_down(str(exc), desired)
        left = plan(desired, observed)
        self._collect_garbage(desired, observed)
        in_sync = not left
        if in_sync and (acted or not self._in_sync):
            names = ", ".join(sorted(desired)) or "none"
            log.info("in sync: the server serves the %d adapter(s) of the set: %s", len(desired), names)
        if in_sync:
            self._last_synced = _now()
        self._in_sync = in_sync
        self._write_status("InSync" if in_sync else "Syncing", desired, observed, left)
        return self.interval

    def _read_set(self) -> dict[str, str] | None:
        """The desired adapters, or None when the file is unreadable (then nothing changes)."""
        try:
            text = self.adapter_set.read_text()
        except OSError as exc:
            text = f"<unreadable: {exc.strerror}>"
        if text == self._set_text:
            return self._desired
        self._set_text = text
        try:
            desired = load_adapter_set(self.adapter_set)
        except ConfigError as exc:
            # A bad set is a spec bug: keep serving what is loaded rather than unloading everything.
            self._set_error, self._desired = str(exc), None
            log.error("%s; keeping the adapters the server has until the file is fixed", redact(str(exc)))
            return None
        old = self._desired
        self._set_error, self._desired = None, desired
        if old is None:
            log.info(
                "adapter set %s: %d adapter(s): %s",
                self.adapter_set,
                len(desired),
                ", ".join(f"{n}={redact(u)}" for n, u in desired.items()) or "none",
            )
        else:
            changes = [f"+{n}" for n in desired if n not in old]
            changes += [f"-{n}" for n in old if n not in desired]
            changes += [f"~{n}" for n in desired if n in old and old[n] != desired[n]]
            log.info("adapter set %s changed: %s", self.adapter_set, " ".join(changes) or "(same adapters)")
        self._in_sync = None
        return desired

    def _apply(self, todo: Plan) -> bool:
        """Send the plan's requests (skipping those waiting to be retried); True if any ran."""
        live = {(n, "") for n in todo.unload} | {*todo.load.items(), *todo.replace.items()}
        self._retries = {k: v for k, v in self._retries.items() if k in live}
        acted = False
        for name in todo.unload:
            if self._waiting((name, "")):
                continue
            acted = True
            try:
                self.server.unload(name)
            except AdapterRequestError as exc:
                self._failed((name, ""), f"cannot unload {name}: {exc}")
                continue
            self._retries.pop((name, ""), None)
            log.info("unloaded adapter %s (not in the adapter set)", name)
        for name, uri in {**todo.load, **todo.replace}.items():
            if self._waiting((name, uri)):
                continue
            acted = True
            replace = name in todo.replace
            t0 = time.monotonic()
            try:
                path = self._local_copy(name, uri)
                self.server.load(name, str(path), replace=replace)
            except (SourceError, AdapterRequestError, OSError) as exc:  # OSError: DEST full, not writable
                self._failed((name, uri), f"adapter {name} from {uri}: {exc}")
                continue
            self._retries.pop((name, uri), None)
            log.info(
                "%s adapter %s from %s in %.1fs",
                "replaced" if replace else "loaded",
                name,
                redact(uri),
                time.monotonic() - t0,
            )
        return acted

    def _local_copy(self, name: str, uri: str) -> Path:
        target = self.copies / copy_name(name, uri)
        if target.is_dir() and fetched_source(target) == uri:
            return target  # fetched by an earlier pass (or an earlier life of this sidecar)
        return fetch({target.name: uri}, self.copies, s3_client=self.s3_client)[target.name]

    def _collect_garbage(self, desired: dict[str, str], observed: Observed) -> None:
        """Remove copies that no loaded adapter uses and no desired adapter will (partials too)."""
        if not self.copies.is_dir():
            return
        keep = {copy_name(n, u) for n, u in desired.items()}
        for root in observed.loaded.values():
            p = local_path(root)
            if p.parent == self.copies:
                keep.add(p.name)
        for entry in self.copies.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                log.info("removed unused adapter copy %s", entry)

    # ------------------------------------------------------------------ retries and backoff

    def _waiting(self, key: tuple[str, str]) -> bool:
        r = self._retries.get(key)
        return r is not None and time.monotonic() < r.not_before

    def _failed(self, key: tuple[str, str], error: str) -> None:
        prev = self._retries.get(key)
        attempts = prev.attempts + 1 if prev else 1
        delay = min(self.interval * 2**attempts, MAX_ADAPTER_BACKOFF)
        self._retries[key] = _Retry(attempts, time.monotonic() + delay, error)
        log.warning("%s (attempt %d; next try in %.0fs)", redact(error), attempts, delay)

    def _server_is_down(self, error: str, desired: dict[str, str]) -> float:
        self._server_failures += 1
        delay = min(0.5 * 2 ** (self._server_failures - 1), MAX_SERVER_BACKOFF)
        if error != self._server_error:
            log.info(
                "waiting for the server: %s (retrying every %.0fs at most)", redact(error), MAX_SERVER_BACKOFF
            )
        self._server_error, self._server_up = error, False
        self._in_sync = False
        self._write_status("WaitingForServer", desired, None)
        return delay

    def _server_is_up(self, observed: Observed) -> None:
        if not self._server_up:
            log.info(
                "server %s is up: base model %s, adapters: %s",
                redact(self.server.url),
                observed.base,
                ", ".join(sorted(observed.loaded)) or "none",
            )
        self._server_error, self._server_failures, self._server_up = None, 0, True

    # ------------------------------------------------------------------ status file

    def _write_status(
        self,
        phase: str,
        desired: dict[str, str] | None,
        observed: Observed | None,
        left: Plan | None = None,
    ) -> None:
        adapters: dict[str, Any] = {}
        for name, uri in (desired or {}).items():
            root = observed.loaded.get(name) if observed else None
            retry = self._retries.get((name, uri))
            adapters[name] = {
                "uri": redact(uri),
                "loaded": root is not None and same_source(root, uri),
                "path": root,
                "error": redact(retry.error) if retry else None,
            }
        status = {
            "phase": phase,
            "inSync": phase == "InSync",
            "checkedAt": _now(),
            "lastInSyncAt": self._last_synced,
            "adapterSet": {"path": str(self.adapter_set), "error": self._set_error},
            "server": {
                "url": redact(self.server.url),
                "reachable": observed is not None,
                "baseModel": observed.base if observed else None,
                "error": redact(self._server_error) if self._server_error else None,
            },
            "adapters": adapters,
            "unloadPending": left.unload if left else [],
        }
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
            tmp.write_text(json.dumps(status, indent=2) + "\n")
            os.replace(tmp, self.status_file)  # readers never see half a file
            self._status_error = None
        except OSError as exc:
            if self._status_error != str(exc):
                log.warning("cannot write the status file %s: %s", self.status_file, exc.strerror)
            self._status_error = str(exc)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set (a pass in progress finishes first)."""
        log.info(
            "adapter-sync: %s -> %s every %.1fs (copies in %s)",
            self.adapter_set,
            redact(self.server.url),
            self.interval,
            self.copies,
        )
        while not stop.is_set():
            stop.wait(self.step())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def api_key_from_env() -> str | None:
    """The key to send: the first key line of the variable (a Secret value may end in a newline)."""
    for var in API_KEY_ENVS:
        keys = [line.strip() for line in os.environ.get(var, "").splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        if keys:
            return keys[0]
    return None
