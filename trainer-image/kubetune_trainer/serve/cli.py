"""``kubetune serve``, ``kubetune fetch`` and ``kubetune adapter-sync``.

``register_serve(sub)``, ``register_fetch(sub)`` and ``register_adapter_sync(sub)`` add the
subcommands to an argparse subparsers object (the main ``kubetune`` CLI lists them with its own
commands); each sets ``func`` to a handler returning the exit code. ``python -m
kubetune_trainer.serve`` runs :func:`main`, which offers the same subcommands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, get_args

from kubetune_trainer.exit_codes import ConfigError, ExitCode, TrainerError, exit_code_for

from .config import Scheduling, ServerConfig, load_adapter_set, parse_adapter_pair


def _field_help(name: str) -> str:
    """A flag's help: the ServerConfig field's description and default (declared there once)."""
    field = ServerConfig.model_fields[name]
    return f"{field.description} (default {field.default})"


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and LoRA adapters with an OpenAI-compatible API",
        description="Serve a base model and any number of LoRA adapters behind an OpenAI-compatible "
        "HTTP API (/v1/completions, /v1/chat/completions, /v1/models), with vLLM's "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter, /health, /ready and /metrics. "
        "Requests for different adapters share the running batch (continuous batching). Flags "
        "override --config.",
    )
    p.add_argument("--config", type=Path, help="YAML file of ServerConfig fields")
    p.add_argument("--base-model", help="base model: directory, file://, s3:// or hub id")
    p.add_argument(
        "--served-name", "--base-model-name", dest="served_name", help="name clients use for the base model"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH_OR_URI",
        help="a LoRA adapter to serve as model NAME (repeatable); PATH_OR_URI is a directory or s3:// prefix",
    )
    p.add_argument(
        "--adapter-set",
        type=Path,
        help='JSON file {"adapters": [{"name": ..., "uri": ...}]} (the AdapterDeployment\'s ConfigMap)',
    )
    p.add_argument("--host", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--max-batch-size", type=int, help=_field_help("max_batch_size"))
    p.add_argument("--batch-window-ms", type=float, help=_field_help("batch_window_ms"))
    p.add_argument("--batch-max-wait-ms", type=float, help=_field_help("batch_max_wait_ms"))
    p.add_argument("--max-model-len", type=int, help="prompt + completion token limit (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--scheduling", choices=get_args(Scheduling), help=_field_help("scheduling"))
    p.add_argument("--download-dir", help="where s3:// sources are downloaded (default: a temp directory)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub base model")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument(
        "--cpu-threads", type=int, help="torch threads on CPU (default: the container's CPU limit)"
    )
    p.add_argument(
        "--api-key-file",
        help="file of API keys, one per line (a mounted Secret): /v1 routes then need "
        "'Authorization: Bearer KEY'; /health, /ready, /metrics stay open",
    )
    p.add_argument(
        "--admin-key-file",
        help="file of admin keys, one per line: only these may load/unload adapters (turns those routes on)",
    )
    p.add_argument(
        "--runtime-adapter-updates",
        action="store_true",
        default=None,
        help="turn /v1/load_lora_adapter and /v1/unload_lora_adapter on (off by default)",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR_OR_S3_PREFIX",
        help="where /v1/load_lora_adapter may load from besides --download-dir (repeatable)",
    )
    p.set_defaults(func=run_serve)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Merge --config, --adapter-set, --adapter and the other flags into one validated config."""
    data: dict[str, Any] = (
        ServerConfig.from_yaml(args.config).model_dump(exclude_unset=True) if args.config else {}
    )
    adapters: dict[str, str] = dict(data.get("adapters") or {})

    def add(name: str, source: str, origin: str) -> None:
        if name in adapters and adapters[name] != source:
            raise ConfigError(f"adapter {name!r} is given twice ({origin}): give each adapter one source")
        adapters[name] = source

    if args.adapter_set:
        for name, source in load_adapter_set(args.adapter_set).items():
            add(name, source, f"--adapter-set {args.adapter_set}")
    for text in args.adapter:
        add(*parse_adapter_pair(text), "--adapter")
    data["adapters"] = adapters
    flags = {
        "base_model": args.base_model,
        "base_model_name": args.served_name,
        "host": args.host,
        "port": args.port,
        "max_batch_size": args.max_batch_size,
        "batch_window_ms": args.batch_window_ms,
        "batch_max_wait_ms": args.batch_max_wait_ms,
        "max_model_len": args.max_model_len,
        "dtype": args.dtype,
        "device": args.device,
        "scheduling": args.scheduling,
        "download_dir": args.download_dir,
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        "cpu_threads": args.cpu_threads,
        "api_key_file": args.api_key_file,
        "admin_key_file": args.admin_key_file,
        "runtime_adapter_updates": args.runtime_adapter_updates,
        "adapter_roots": [*(data.get("adapter_roots") or []), *args.adapter_root] or None,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    config = ServerConfig.validated(data, source="kubetune serve")
    if not config.base_model and not config.adapters:
        raise ConfigError(
            "nothing to serve: give --base-model and/or --adapter NAME=PATH_OR_URI (or --adapter-set)"
        )
    return config


def run_serve(args: argparse.Namespace) -> int:
    from .server import ModelServer
    from .sources import SourceError

    config = server_config_from_args(args)
    try:
        ModelServer(config).start()
    except SourceError as exc:
        raise TrainerError(str(exc), ExitCode.UNEXPECTED if exc.retryable else ExitCode.BAD_CONFIG) from None
    return 0


def register_fetch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch",
        help="download adapters or models from s3:// (init containers)",
        description="Download model or adapter files. Either --source URI --dest DIR (the files under "
        "URI go into DIR), or --dest DIR NAME=URI ... (each into DIR/NAME, as vLLM's --lora-modules "
        "expects). Credentials and endpoint come from the standard AWS_* environment.",
    )
    p.add_argument("--dest", required=True, type=Path, help="destination directory")
    p.add_argument("--source", help="one s3:// prefix (or directory) whose files go into --dest")
    p.add_argument("pairs", nargs="*", metavar="NAME=URI", help="sources that go into DEST/NAME")
    p.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    from .sources import SourceError, fetch, fetch_one

    if bool(args.source) == bool(args.pairs):
        raise ConfigError(
            "kubetune fetch: give either --source URI or NAME=URI pairs (not both, not neither)"
        )
    try:
        if args.source:
            fetch_one(args.source, args.dest)
            print(f"fetched {args.source} -> {args.dest}")
        else:
            pairs: dict[str, str] = {}
            for text in args.pairs:
                name, uri = parse_adapter_pair(text, flag="fetch")
                if name in pairs:
                    raise ConfigError(f"kubetune fetch: {name!r} is given twice")
                pairs[name] = uri
            for name, path in fetch(pairs, args.dest).items():
                print(f"fetched {pairs[name]} -> {path}")
    except SourceError as exc:
        raise TrainerError(str(exc), ExitCode.UNEXPECTED if exc.retryable else ExitCode.BAD_CONFIG) from None
    return 0


def register_adapter_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapter-sync",
        help="keep a running server's LoRA adapters equal to an adapter-set file (hot-reload sidecar)",
        description="Watch the adapter-set file (the AdapterDeployment's ConfigMap) and make the server's "
        "loaded adapters match it: fetch new ones (s3:// or local) into --dest and call "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM or kubetune serve). Level-based: "
        "re-checks every --interval seconds and converges after a restart of either side; SIGTERM "
        "stops it. Credentials come from the standard AWS_* environment; a bearer token for the "
        "server from KUBETUNE_SERVER_API_KEY or VLLM_API_KEY.",
    )
    p.add_argument(
        "--adapter-set",
        required=True,
        type=Path,
        help='JSON file {"adapters": [{"name": ..., "uri": ...}]} (re-read on every pass)',
    )
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument(
        "--dest", required=True, type=Path, help="where adapters are fetched (shared with the server)"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between passes (default 2)")
    p.add_argument(
        "--status-file",
        type=Path,
        help="JSON status written after every pass (default DEST/.kubetune-sync/status.json)",
    )
    p.set_defaults(func=run_adapter_sync)


def run_adapter_sync(args: argparse.Namespace) -> int:
    import signal
    import threading

    import httpx

    from .adapter_sync import AdapterSync, ServerClient, api_key_from_env

    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval}: give a number of seconds > 0, e.g. 2")
    url = httpx.URL(args.server)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--server {args.server!r}: give the server's URL, e.g. http://127.0.0.1:8000")
    try:
        args.dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--dest {args.dest}: cannot create it ({exc.strerror}): give a writable directory"
        ) from None
    # httpx logs every request at INFO (a line per poll, with the full URL, userinfo included).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("kubetune.adapter_sync").info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = ServerClient(args.server, api_key=api_key_from_env())
    try:
        AdapterSync(
            args.adapter_set, server, args.dest, interval=args.interval, status_file=args.status_file
        ).run(stop)
    finally:
        server.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.serve", description="kubetune serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_serve(sub)
    register_fetch(sub)
    register_adapter_sync(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = int(exit_code_for(exc))
        if code == ExitCode.UNEXPECTED:
            logging.getLogger("kubetune").exception("kubetune %s failed", args.command)
        print(f"kubetune {args.command}: error: {exc}", file=sys.stderr)
        return code
