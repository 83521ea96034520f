"""Data files on local disk: records given as a list written to JSONL, ``s3://`` data downloaded
once per node, and the augmentation's files and models made local, before the pipeline reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.data.options import DataSource, SourceFormat
from kubetune_trainer.distributed import DistInfo
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.models import resolve_model_path

# What train()/test() accept as data: a file path, or the records themselves.
DataInput = str | os.PathLike[str] | Sequence[dict[str, Any]] | None


def local_source(
    path: str | None, scratch: Path, dist: DistInfo, fmt: SourceFormat = "auto", weight: float = 1.0
) -> DataSource | None:
    """A ``DataSource`` readable from disk (None for an unset file).

    An ``s3://`` object is downloaded into ``scratch`` by local rank 0 (call this under
    ``distributed.local_main_first``); its URI stays as the source's ``origin``, which errors and the
    provenance name instead of the local copy.
    """
    if not path:
        return None
    if not path.startswith("s3://"):
        return DataSource(path, fmt, weight)
    from kubetune_trainer.storage import S3Uri, s3_client_from_env
    from kubetune_trainer.storage.transfer import download_files

    uri = S3Uri.parse(path, field="data file")
    local = scratch / "s3" / f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{Path(uri.key).name}"
    if dist.is_local_rank0 and not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".partial")
        download_files(s3_client_from_env(), [(uri, tmp, None)], what=f"download of {path}")
        os.replace(tmp, local)
    return DataSource(str(local), fmt, weight, origin=path)


def augmentation_synonyms_file(cfg: FinetuningConfig, scratch: Path, dist: DistInfo) -> str | None:
    """The augmentation's synonyms file on local disk (downloaded when s3://)."""
    aug = cfg.augmentation
    if aug is None or aug.synonyms is None or not aug.synonyms.synonyms_file:
        return None
    source = local_source(aug.synonyms.synonyms_file, scratch, dist)
    return source.path if source is not None else None


def local_augmentation(cfg: FinetuningConfig, synonyms_file: str | None, dist: DistInfo) -> Any:
    """The augmentation settings with local files and model directories (s3:// models downloaded)."""
    aug = cfg.augmentation
    if aug is None:
        return None
    update: dict[str, Any] = {}
    if aug.synonyms is not None and synonyms_file:
        update["synonyms"] = aug.synonyms.model_copy(update={"synonyms_file": synonyms_file})
    if aug.paraphrase is not None:
        update["paraphrase"] = aug.paraphrase.model_copy(
            update={"model": resolve_model_path(aug.paraphrase.model, dist)}
        )
    if aug.back_translation is not None:
        bt = aug.back_translation
        update["back_translation"] = bt.model_copy(
            update={
                "model": resolve_model_path(bt.model, dist),
                "back_model": resolve_model_path(bt.back_model, dist),
            }
        )
    return aug.model_copy(update=update)


def materialise(data: DataInput, scratch: Path, name: str) -> str:
    """A file path for ``data`` (a path, or records written to a JSONL file)."""
    if isinstance(data, str | os.PathLike):
        return str(data)
    rows = list(data or [])
    if not rows:
        raise ConfigError(f"{name} data is an empty list")
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} data[{i}] is a {type(row).__name__}; records must be dicts")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)
