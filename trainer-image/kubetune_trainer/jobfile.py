"""``kubetune run FILE --local``: a FinetuningConfig YAML, or a FineTuneJob manifest.

A manifest is converted by the operator package (kubetune_operator.convert), imported only
here and only for a manifest, so the trainer never needs the operator at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError


def load_job_file(path: str | os.PathLike[str]) -> FinetuningConfig:
    """A FinetuningConfig YAML, or a FineTuneJob manifest converted by the operator package."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and data.get("kind") == "FineTuneJob":
        try:
            from kubetune_operator.convert import finetunejob_to_config
        except ImportError:
            raise ConfigError(
                f"{p} is a FineTuneJob manifest, and converting manifests needs the operator package "
                "(kubetune_operator.convert), which is not available here; run a FinetuningConfig YAML "
                "instead (see docs/trainer.md)"
            ) from None
        try:
            return finetunejob_to_config(data, base_dir=p.parent)
        except ConfigError:
            raise
        except ValueError as exc:  # what the manifest asks cannot run locally (pvc://, a job reference)
            raise ConfigError(f"{p}: {exc}") from None
    return FinetuningConfig.from_dict(data or {}, source=str(p)).resolve_paths(p.parent)
