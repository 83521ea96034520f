"""Where a model comes from: ``model_name`` (and init_adapter, augmentation models) resolved to a
local directory or hub id, ``s3://`` models downloaded once per node, and the tokenizer.

Loading the weights and wrapping them for a method is ``methods.py``'s part.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.distributed import DistInfo, local_main_first
from kubetune_trainer.exit_codes import ConfigError

log = logging.getLogger(__name__)


def resolve_model_path(name: str, dist: DistInfo) -> str:
    """A local directory for ``model_name`` (downloading ``s3://``), or a hub id as given."""
    if name.startswith("file://"):
        name = name.removeprefix("file://")
    elif name.startswith("hf://"):
        return name.removeprefix("hf://")
    elif name.startswith("pvc://"):
        raise ConfigError(
            f"model_name {name!r}: pvc:// models are mounted into the pod by the operator; locally, "
            "give the directory path instead"
        )
    elif name.startswith("s3://"):
        return download_model(name, dist)
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p)
    looks_local = name.startswith((".", "/", "~")) or not looks_like_hub_id(name)
    if looks_local:
        raise ConfigError(
            f"model_name {name!r}: directory not found; give a model directory (e.g. one made by "
            "`kubetune make-tiny-model DIR`), an s3:// URI or a hub id"
        )
    return name  # a hub id: transformers resolves (and fails clearly without network)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "/"))


def download_model(uri: str, dist: DistInfo, marker: str = "config.json", field: str = "model_name") -> str:
    """Download the ``s3://`` prefix ``uri`` once per node (cached by URI); ``marker`` must be in it."""
    from kubetune_trainer.storage import download_prefix

    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "models"
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".kubetune-complete"
    with local_main_first(dist):
        if not done.exists() and dist.is_local_rank0:
            log.info("downloading %s %s to %s", field, uri, target)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
            download_prefix(uri.rstrip("/") + "/", tmp)
            if not (tmp / marker).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(
                    f"{field} {uri!r}: no {marker} under that prefix; point at the directory that holds it"
                )
            (tmp / ".kubetune-complete").write_text(uri)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return str(target)


def load_tokenizer(path: str, config: FinetuningConfig) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.model_revision:
        kwargs["revision"] = config.model_revision
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def architecture_of(model: Any) -> dict[str, Any]:
    """What an adapter needs of its base model to fit (recorded in provenance.json, compared by
    init_adapter): the architecture and the shapes the adapter's layers attach to."""
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}
