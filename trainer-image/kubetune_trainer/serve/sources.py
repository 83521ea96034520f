"""Where models and adapters come from: local directories, ``file://`` and ``s3://`` prefixes.

s3:// sources are downloaded with the storage package's transfer manager (parallel, retried,
standard AWS_* environment). ``fetch`` is what ``kubetune fetch`` runs in the vLLM init container.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# fetch() records where a directory came from, so `kubetune adapter-sync` can tell which URI a
# running server's adapter (listed by its local path) was loaded from.
SOURCE_MARKER = ".kubetune-source.json"
# Mixed-adapter batches are a LoRA-family feature of PEFT (adapter_names= in forward/generate).
MIXABLE_PEFT_TYPES = frozenset({"LORA"})


class SourceError(ValueError):
    """A model or adapter source cannot be used; the message names it and says how to fix it."""

    retryable = False  # True for transfer failures that may pass on a later attempt


class SourceTransferError(SourceError):
    """A download failed after the storage layer's retries (network, permissions, server errors)."""

    retryable = True


class SourceNotFoundError(SourceError):
    """The source does not exist (a missing directory, or nothing under an s3:// prefix)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()


def default_download_dir() -> Path:
    return Path(tempfile.gettempdir()) / "kubetune-serve"


def download(uri: str, dest: Path, *, s3_client: Any = None) -> Path:
    """Download everything under the s3:// prefix ``uri`` into ``dest`` (created)."""
    from kubetune_trainer.storage import S3ConfigError, S3UriError, StorageError, download_prefix

    dest.mkdir(parents=True, exist_ok=True)
    try:
        download_prefix(uri, dest, client=s3_client)
    except StorageError as exc:
        text = str(exc)
        cls: type[SourceError] = SourceTransferError
        if isinstance(exc, S3UriError | S3ConfigError):
            cls = SourceError  # a typo in the URI or the environment: retrying cannot help
        elif "nothing to download" in text:
            cls = SourceNotFoundError
        raise cls(f"cannot download {uri}: {text}") from None
    return dest


def materialize(uri: str, what: str, *, download_dir: Path, s3_client: Any = None) -> Path:
    """A local directory holding ``uri``: the path itself, or a fresh download of an s3:// prefix.

    Every download goes to a new subdirectory, so reloading an adapter under the same name never
    mixes old and new files.
    """
    if is_s3(uri):
        dest = download_dir / f"{what.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
        log.info("downloading %s from %s to %s", what, uri, dest)
        return download(uri, dest, s3_client=s3_client)
    if "://" in uri and not uri.startswith("file://"):
        raise SourceError(
            f"{what}: {uri!r} has an unsupported scheme: use a local directory, file:// or s3://"
        )
    path = local_path(uri)
    if not path.is_dir():
        raise SourceNotFoundError(f"{what}: no directory at {path}: check the path (or use an s3:// URI)")
    return path


@dataclass(frozen=True)
class AdapterInfo:
    """What the server needs to know from an adapter's adapter_config.json."""

    path: Path
    peft_type: str
    rank: int | None
    base_model: str | None


def read_adapter_config(path: Path, name: str) -> AdapterInfo:
    """Check that ``path`` is a PEFT LoRA adapter directory; errors say what is wrong."""
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        hint = (
            " (it holds a full model: serve it as the base model instead)"
            if (path / "config.json").is_file()
            else ""
        )
        raise SourceError(
            f"adapter {name!r}: {path} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter{hint}"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"adapter {name!r}: cannot read {cfg_file}: {exc}") from None
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in MIXABLE_PEFT_TYPES:
        raise SourceError(
            f"adapter {name!r}: {cfg_file} is a {peft_type or 'unknown'} adapter; the built-in server "
            "serves LoRA adapters (they share one batch). Merge it into a model (output.merged) and "
            "serve that as the base model, or train with method lora"
        )
    if cfg.get("use_dora"):
        raise SourceError(
            f"adapter {name!r}: {cfg_file} is a DoRA adapter (use_dora: true), which PEFT cannot mix with "
            "other adapters in one batch: merge it into a model and serve that as the base model"
        )
    rank = cfg.get("r")
    return AdapterInfo(
        path=path,
        peft_type=peft_type,
        rank=int(rank) if isinstance(rank, int) else None,
        base_model=cfg.get("base_model_name_or_path") or None,
    )


def fetch(pairs: dict[str, str], dest: str | os.PathLike[str], *, s3_client: Any = None) -> dict[str, Path]:
    """Put each ``name -> uri`` into ``dest/name`` (download s3://, copy local directories).

    Used by ``kubetune fetch`` in init containers and by ``kubetune adapter-sync``: the server then
    reads plain directories. A partial download never takes the final name (downloads go to a
    temporary sibling first). Each directory gets a :data:`SOURCE_MARKER` naming its URI.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, uri in pairs.items():
        final = root / name
        staging = root / f".{name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            if is_s3(uri):
                download(uri, staging, s3_client=s3_client)
            else:
                src = materialize(uri, name, download_dir=root)
                shutil.copytree(src, staging)
            (staging / SOURCE_MARKER).write_text(json.dumps({"uri": uri}))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %s -> %s", uri, final)
        out[name] = final
    return out


def fetched_source(path: str | os.PathLike[str]) -> str | None:
    """The URI that :func:`fetch` put into ``path``, or None (not fetched by it, or unreadable)."""
    try:
        uri = json.loads((Path(path) / SOURCE_MARKER).read_text()).get("uri")
    except (OSError, ValueError, AttributeError):
        return None
    return uri if isinstance(uri, str) else None


def fetch_one(uri: str, dest: str | os.PathLike[str], *, s3_client: Any = None) -> Path:
    """Put the contents of ``uri`` directly into ``dest`` (``kubetune fetch --source URI --dest DIR``)."""
    root = Path(dest)
    if is_s3(uri):
        return download(uri, root, s3_client=s3_client)
    src = materialize(uri, "source", download_dir=root)
    shutil.copytree(src, root, dirs_exist_ok=True)
    return root


def check_allowed_source(source: str, roots: list[str]) -> None:
    """Refuse a runtime load from outside ``roots`` (local directories and s3:// prefixes).

    Local paths are resolved first (symlinks, ``..``), so a path cannot climb out of its root;
    an s3:// URI must lie under a root prefix segment by segment (``s3://b/adapters`` allows
    ``s3://b/adapters/x``, not ``s3://b/adapters-x``).
    """
    allowed = ", ".join(roots) or "none"
    if is_s3(source):
        key = source[len("s3://") :].rstrip("/")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise SourceError(f"lora_path {source!r}: an s3:// URI must not hold empty, '.' or '..' segments")
        for root in roots:
            if is_s3(root):
                prefix = root[len("s3://") :].rstrip("/")
                if key == prefix or key.startswith(prefix + "/"):
                    return
        raise PermissionError(
            f"lora_path {source!r} is outside the storage this server may load from ({allowed}): "
            "upload the adapter there, or add its prefix to the server's adapter_roots (--adapter-root)"
        )
    if "://" in source and not source.startswith("file://"):
        raise SourceError(
            f"lora_path {source!r} has an unsupported scheme: use a directory, file:// or s3://"
        )
    path = local_path(source).resolve()
    for root in roots:
        if not is_s3(root) and path.is_relative_to(local_path(root).resolve()):
            return
    raise PermissionError(
        f"lora_path {source!r} is outside the directories this server may load from ({allowed}): "
        "put the adapter there (adapter-sync does), or add the directory to adapter_roots (--adapter-root)"
    )
