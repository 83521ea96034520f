"""What a training pod does around training: fetch s3:// data, report to the operator.

- Data files named by s3:// URIs are downloaded once per node (local rank 0; the others wait)
  into the pod's workspace, and the config is rewritten to the local copies.
- The result goes to the container's termination message (Kubernetes shows it in the pod
  status, where the operator reads it): a JSON report on success, the error on failure. The
  path is `$KUBETUNE_TERMINATION_MESSAGE_PATH`, else /dev/termination-log when it exists.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kubetune_trainer.config import FinetuningConfig

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096  # what the kubelet keeps of a termination message


def termination_path() -> Path | None:
    explicit = os.environ.get("KUBETUNE_TERMINATION_MESSAGE_PATH")
    if explicit:
        return Path(explicit)
    default = Path("/dev/termination-log")
    return default if default.exists() and os.access(default, os.W_OK) else None


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def write_report(report: dict[str, Any]) -> None:
    """Rank 0 only: the success report (adapterUri, parameter counts, metrics)."""
    path = termination_path()
    if path is None or not _is_rank0():
        return
    text = json.dumps(report, separators=(",", ":"), default=float)
    if len(text) > MAX_MESSAGE:  # keep what the operator needs most
        text = json.dumps({k: v for k, v in report.items() if k != "metrics"}, separators=(",", ":"))
    path.write_text(text)


def write_error(message: str) -> None:
    """Any rank: why this process failed (the operator shows the failed pod's message)."""
    path = termination_path()
    if path is None:
        return
    try:
        path.write_text(message[-MAX_MESSAGE:])
    except OSError as e:  # never hide the real error behind this one
        log.warning("could not write the termination message to %s: %s", path, e)


def stage_inputs(config: FinetuningConfig, dest: Path) -> FinetuningConfig:
    """Download s3:// data files once per node; return the config pointing at the local copies."""
    uris: dict[str, str] = {}

    def local(value: str | None, name: str) -> str | None:
        if not value or not value.startswith("s3://"):
            return value
        uris[value] = str(dest / name / value.rstrip("/").rsplit("/", 1)[-1])
        return uris[value]

    update: dict[str, Any] = {
        key: local(getattr(config, key), key)
        for key in ("train_file", "validation_file", "test_file", "replay_file")
    }
    update["mixture"] = [
        m.model_copy(update={"path": local(m.path, f"mixture-{i}")}) for i, m in enumerate(config.mixture)
    ]
    if not uris:
        return config
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from kubetune_trainer.storage import S3Uri, s3_client_from_env
        from kubetune_trainer.storage.retry import call_with_retry

        client = s3_client_from_env()
        for uri, path in uris.items():
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            loc = S3Uri.parse(uri)
            tmp = target.with_name(target.name + ".part")
            log.info("fetching %s", uri)
            call_with_retry(
                lambda loc=loc, tmp=tmp: client.download_file(loc.bucket, loc.key, str(tmp)),
                f"download {uri}",
            )
            tmp.rename(target)
        (dest / ".staged").write_text("\n".join(uris))
    else:
        _wait_for(dest / ".staged")
    return config.model_copy(update=update)


def _wait_for(marker: Path, timeout_s: float = 3600) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not finish downloading the data within {timeout_s:.0f}s")
        time.sleep(0.5)
