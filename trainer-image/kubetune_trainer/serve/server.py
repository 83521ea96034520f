"""``ModelServer``: the guide's serving API over the engine and the HTTP app.

    server = ModelServer(ServerConfig(base_model="./tiny-model"))
    server.load_model("sql", "./adapters/sql")       # a PEFT adapter directory or s3:// URI
    server.load_model("chat", "s3://bucket/adapters/chat")
    server.set_adapter("sql")                         # the model used when a request names none
    server.start(port=8000)                           # blocks; OpenAI API on http://host:8000/v1

``load_model(name, path)`` loads a LoRA adapter when ``path`` holds an ``adapter_config.json``
(the base model comes from the config, or from the adapter's ``base_model_name_or_path``), and
otherwise loads ``path`` as the base model served under ``name``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .backend import AdapterState
from .config import BASE_ROW, ServerConfig, check_adapter_name
from .engine import Engine
from .metrics import ServerMetrics
from .rows import Failed, Finished, Row, TextDelta
from .sources import (
    ADAPTER_CONFIG,
    SourceError,
    default_download_dir,
    is_s3,
    local_path,
    materialize,
    read_adapter_config,
)

log = logging.getLogger(__name__)


def default_served_name(source: str) -> str:
    """The name clients use for a base model: its directory name, or the hub id."""
    s = source.rstrip("/")
    if is_s3(s) or s.startswith("file://") or Path(s).expanduser().exists():
        return s.rsplit("/", 1)[-1] or s
    return s  # a hub id such as "org/model"


class ModelServer:
    """A multi-adapter, OpenAI-compatible model server (see module docstring)."""

    def __init__(
        self,
        config: ServerConfig | dict[str, Any] | None = None,
        *,
        s3_client: Any = None,
        **overrides: Any,
    ):
        if config is None:
            data: dict[str, Any] = {}
        elif isinstance(config, ServerConfig):
            data = config.model_dump(exclude_unset=True)
        else:
            data = dict(config)
        data.update(overrides)
        self.config = ServerConfig.validated(data)
        self.s3_client = s3_client
        self.metrics = ServerMetrics()
        self.engine = Engine(
            max_batch_size=self.config.max_batch_size,
            batch_window_ms=self.config.batch_window_ms,
            batch_max_wait_ms=self.config.batch_max_wait_ms,
            scheduling=self.config.scheduling,
            metrics=self.metrics,
        )
        self.download_dir = (
            Path(self.config.download_dir) if self.config.download_dir else default_download_dir()
        )
        self.base_name: str | None = None
        self.base_source: str | None = None
        self.base_error: str | None = None
        self.adapters: dict[str, AdapterState] = {}
        self.default_model: str | None = None
        self.fatal: BaseException | None = None
        self.created = int(time.time())
        self.lock = (
            threading.RLock()
        )  # guards adapters, base_name and the default model (the API takes it too)
        # Adapters downloaded to find the base model, kept for the load that follows (no second download).
        self._prefetched: dict[tuple[str, str], Path] = {}
        self._loader: threading.Thread | None = None
        self._app: Any = None
        self._json_grammars: Any = None
        from .auth import Access

        self.access = Access(
            self.config.api_key_file, self.config.admin_key_file, self.config.runtime_adapter_updates
        )
        log.info("access: %s", self.access.describe())

    def json_grammar(self, schema: dict[str, Any] | None) -> Any:
        """A compiled JSON grammar for this server's tokenizer (response_format); slow the first time."""
        with self.lock:
            if self._json_grammars is None:
                from .structured import JsonGrammars

                lm = self.lm
                self._json_grammars = JsonGrammars(lm.tokenizer, lm.vocab_size, lm.eos_ids)
            grammars = self._json_grammars
        return grammars.compile(schema)

    def adapter_roots(self) -> list[str]:
        """Where /v1/load_lora_adapter may load from: the download directory and adapter_roots."""
        return [str(self.download_dir), *self.config.adapter_roots]

    # ------------------------------------------------------------------ guide API

    def load_model(self, name: str, path: str) -> None:
        """Load a LoRA adapter (``path`` has adapter_config.json) or the base model, served as ``name``."""
        if is_s3(path):  # download first: only the files tell an adapter from a model
            local_dir = self._fetch_adapter(name, path)
            if (local_dir / ADAPTER_CONFIG).is_file():
                self._prefetched[(name, path)] = local_dir
                self.load_adapter(name, path)
            else:
                self._load_base(path, name, local_dir=local_dir)
            return
        local = local_path(path)
        if local.is_dir() and not (local / ADAPTER_CONFIG).is_file():
            self._load_base(path, name)
            return
        if not local.exists() and self.lm is None and "://" not in path:
            # Neither a directory nor s3: a hub id for the base model.
            self._load_base(path, name)
            return
        self.load_adapter(name, path)

    def set_adapter(self, name: str) -> None:
        """Serve ``name`` (an adapter or the base model) to requests that name no model."""
        with self.lock:
            if name != self.base_name and not (name in self.adapters and self.adapters[name].loaded):
                raise KeyError(
                    f"model {name!r} is not loaded; loaded: {', '.join(self.model_names()) or 'none'}"
                )
            self.default_model = name

    def start(self, host: str | None = None, port: int | None = None) -> None:
        """Serve HTTP until SIGINT/SIGTERM (blocking); configured models load in the background."""
        import uvicorn

        sock = _bind(host or self.config.host, self.config.port if port is None else port)
        server = uvicorn.Server(self._uvicorn_config())
        self._begin(on_fatal=lambda: setattr(server, "should_exit", True))
        log.info("serving on http://%s:%d/v1", *sock.getsockname()[:2])
        if threading.current_thread() is threading.main_thread():
            # Uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to whatever handler
            # was installed before it: this one makes that a normal return (exit code 0).
            signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM"))
        try:
            server.run(sockets=[sock])
        finally:
            self.close()
        if self.fatal is not None:
            raise self.fatal

    # ------------------------------------------------------------------ running in a thread

    def start_background(self, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
        """Serve HTTP from a background thread (tests, notebooks); ``port=0`` picks a free port."""
        import uvicorn

        sock = _bind(host, port)
        server = uvicorn.Server(self._uvicorn_config())
        self._begin(on_fatal=None)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="kubetune-http", daemon=True
        )
        thread.start()
        running = RunningServer(self, server, thread, sock.getsockname()[1], host)
        running.wait_started()
        return running

    def _uvicorn_config(self) -> Any:
        import uvicorn

        # Uvicorn's own access log duplicates the metrics; warnings and errors still show.
        return uvicorn.Config(
            self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=30, lifespan="off"
        )

    def _begin(self, on_fatal: Any) -> None:
        self.engine.start()
        if self._loader is None:
            self._loader = threading.Thread(
                target=self._load_configured, args=(on_fatal,), name="kubetune-loader", daemon=True
            )
            self._loader.start()

    def wait_loaded(self, timeout: float = 600.0) -> None:
        """Block until the configured models have been loaded (or failed to)."""
        if self._loader is not None:
            self._loader.join(timeout)

    def close(self) -> None:
        self.engine.stop()

    @property
    def app(self) -> Any:
        if self._app is None:
            from .app import build_app
            from .auth import AuthMiddleware

            self._app = AuthMiddleware(build_app(self), self.access)
        return self._app

    # ------------------------------------------------------------------ loading

    @property
    def lm(self) -> Any:
        return self.engine.lm

    def load(self) -> None:
        """Load the configured base model and adapters now (raises on the first failure)."""
        self._load_configured(on_fatal=None, raise_errors=True)

    def _load_configured(self, on_fatal: Any, raise_errors: bool = False) -> None:
        try:
            if self.lm is None and (self.config.base_model or self.config.adapters):
                self._load_base(self._configured_base_source(), self.config.base_model_name)
        except Exception as exc:
            log.error("the base model could not be loaded: %s", exc)
            with self.lock:
                self.base_error = str(exc)
                self.fatal = exc
            if raise_errors:
                raise
            if on_fatal is not None:
                on_fatal()
            return
        with self.lock:
            todo = {n: s for n, s in self.config.adapters.items() if n not in self.adapters}
            for name, source in todo.items():
                self.adapters[name] = AdapterState(source=source)
                self.metrics.adapter_loaded.labels(name).set(0)
        # Downloads run in parallel; each load into the model is a short step on the worker.
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="kubetune-fetch"
        ) as pool:
            futures = {pool.submit(self._load_adapter_now, n, s, False): n for n, s in todo.items()}
            for fut in concurrent.futures.as_completed(futures):
                name = futures[fut]
                try:
                    fut.result()
                except Exception as exc:
                    log.error("adapter %s could not be loaded: %s", name, exc)
                    if raise_errors:
                        raise

    def _configured_base_source(self) -> str:
        if self.config.base_model:
            return self.config.base_model
        # No base configured: take it from the first adapter's adapter_config.json.
        for name, source in self.config.adapters.items():
            path = self._fetch_adapter(name, source)
            self._prefetched[(name, source)] = path
            info = read_adapter_config(path, name)
            if info.base_model:
                return info.base_model
        raise SourceError(
            "no base model: set base_model (--base-model), or use adapters whose adapter_config.json "
            "names base_model_name_or_path"
        )

    def _load_base(self, source: str, name: str | None, *, local_dir: Path | None = None) -> None:
        from .model import LoadedModel

        with self.lock:
            if self.lm is not None:
                raise ValueError(
                    f"base model {self.base_name!r} is already loaded: a server serves one base model "
                    "(load adapters for it instead)"
                )
        served = name or self.config.base_model_name or default_served_name(source)
        if served in self.adapters:
            raise ValueError(
                f"{served!r} is already an adapter name: serve the base model under another name"
            )
        where = source
        if local_dir is not None:
            where = str(local_dir)
        elif is_s3(source):
            where = str(
                materialize(source, "base-model", download_dir=self.download_dir, s3_client=self.s3_client)
            )
        elif source.startswith("hf://"):
            where = source[len("hf://") :]
        elif source.startswith(("file://", "/", ".", "~")) or local_path(source).exists():
            # A path (not a hub id): it must exist here.
            where = str(materialize(source, "base model", download_dir=self.download_dir))
        t0 = time.monotonic()
        lm = LoadedModel.load(
            where,
            dtype=self.config.dtype,
            device=self.config.device,
            max_model_len=self.config.max_model_len,
            trust_remote_code=self.config.trust_remote_code,
            cpu_threads=self.config.cpu_threads,
            revision=self.config.revision,
        )

        def install() -> None:
            self.engine.lm = lm
            self.engine.base_name = served

        self.engine.call(install).result()
        with self.lock:
            self.base_name, self.base_source, self.base_error = served, source, None
        self.metrics.adapter_loaded.labels(served).set(1)
        log.info(
            "base model %s loaded from %s in %.1fs on %s", served, source, time.monotonic() - t0, lm.device
        )

    def load_adapter(self, name: str, source: str, *, replace: bool = False) -> None:
        """Load (or with ``replace``, reload) a LoRA adapter; it becomes part of the served set."""
        check_adapter_name(name)
        with self.lock:
            if name == self.base_name:
                raise ValueError(f"{name!r} is the base model's name: choose another adapter name")
            state = self.adapters.get(name)
            if state is not None and state.loaded and not replace:
                raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        if self.lm is None:
            self._load_base(self._base_for_adapter(name, source), self.config.base_model_name)
        with self.lock:
            known = name in self.adapters
            self.adapters.setdefault(name, AdapterState(source=source, adding=True))
        try:
            self._load_adapter_now(name, source, replace)
        except Exception:
            if not known:  # a failed request adds nothing to the set the server must serve
                with self.lock:
                    self.adapters.pop(name, None)
                _forget_series(self.metrics.adapter_loaded, name)
            raise

    def _fetch_adapter(self, name: str, source: str) -> Path:
        return materialize(
            source, f"adapter-{name}", download_dir=self.download_dir, s3_client=self.s3_client
        )

    def _base_for_adapter(self, name: str, source: str) -> str:
        if self.config.base_model:
            return self.config.base_model
        path = self._fetch_adapter(name, source)
        self._prefetched[(name, source)] = path
        info = read_adapter_config(path, name)
        if not info.base_model:
            raise SourceError(
                f"adapter {name!r}: no base model configured and its adapter_config.json names none: "
                "set base_model"
            )
        return info.base_model

    def _load_adapter_now(self, name: str, source: str, replace: bool) -> None:
        state = self.adapters[name]
        try:
            path = self._prefetched.pop((name, source), None) or self._fetch_adapter(name, source)
            info = read_adapter_config(path, name)
            lm = self.lm
            self.engine.call(lambda: lm.add_adapter(name, info, replace=replace)).result()
        except Exception as exc:
            with self.lock:
                # A failed reload leaves the previous weights serving if they are still loaded.
                still = lm_has(self.lm, name)
                state.loaded, state.error = still, str(exc)
            raise
        with self.lock:
            state.source, state.loaded, state.error, state.path, state.rank = (
                source,
                True,
                None,
                str(path),
                info.rank,
            )
            state.adding = False
        self.metrics.adapter_loaded.labels(name).set(1)
        log.info("adapter %s loaded from %s (rank %s)", name, source, info.rank)

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``; requests for it still queued fail with 'not loaded'."""
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            state = self.adapters.pop(name)
            if self.default_model == name:
                self.default_model = None
        if state.loaded:
            lm = self.lm
            self.engine.call(lambda: lm.remove_adapter(name)).result()
        _forget_series(self.metrics.adapter_loaded, name)

    # ------------------------------------------------------------------ introspection

    def model_names(self) -> list[str]:
        with self.lock:
            names = [self.base_name] if self.base_name else []
            return names + sorted(n for n, s in self.adapters.items() if s.loaded)

    def resolve_model(self, requested: str | None) -> str | None:
        """The row model (adapter name or BASE_ROW) for a request's ``model``, or None if unknown."""
        with self.lock:
            name = requested or self.default_model or self.base_name
            if name is None:
                return None
            if name == self.base_name:
                return BASE_ROW
            state = self.adapters.get(name)
            return name if state is not None and state.loaded else None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            missing = []
            if self.lm is None:
                configured = self.config.base_model or self.config.adapters
                why = self.base_error or ("loading" if configured else "none configured: call load_model()")
                missing.append(f"base model ({why})")
            adapters = {}
            for name, s in sorted(self.adapters.items()):
                adapters[name] = {"loaded": s.loaded, "source": s.source, "error": s.error}
                if not s.loaded and not s.adding:
                    missing.append(f"adapter {name} ({s.error or 'loading'})")
            if not self.engine.running:
                missing.append("the engine is not running")
            detail: dict[str, Any] = {
                "ready": not missing,
                "base_model": {
                    "name": self.base_name,
                    "loaded": self.lm is not None,
                    "error": self.base_error,
                },
                "adapters": adapters,
                "missing": missing,
            }
            return not missing, detail

    # ------------------------------------------------------------------ in-process generation

    def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        timeout: float = 600.0,
    ) -> str:
        """Generate through the same engine and batching as HTTP requests (from any thread)."""
        target = self.resolve_model(model)
        if target is None:
            raise KeyError(
                f"model {model!r} is not loaded; loaded: {', '.join(self.model_names()) or 'none'}"
            )
        events: queue.Queue[Any] = queue.Queue()
        row = Row(
            prompt_ids=self.lm.tokenizer(prompt).input_ids,
            model=target,
            max_tokens=max_tokens,
            sink=events.put,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
        )
        self.engine.start()
        self.engine.submit(row)
        text = []
        while True:
            event = events.get(timeout=timeout)
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                return "".join(text)
            elif isinstance(event, Failed):
                raise event.error


def _forget_series(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def lm_has(lm: Any, name: str) -> bool:
    return lm is not None and name in lm.adapters


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from kubetune_trainer.exit_codes import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}: choose another --port") from None
    sock.set_inheritable(True)
    return sock


class RunningServer:
    """A server running in background threads; ``stop()`` (or leaving ``with``) shuts it down."""

    def __init__(
        self, model_server: ModelServer, server: Any, thread: threading.Thread, port: int, host: str
    ):
        self.model_server = model_server
        self._server = server
        self._thread = thread
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.model_server.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def wait_future(fut: concurrent.futures.Future) -> Any:
    return await asyncio.wrap_future(fut)
