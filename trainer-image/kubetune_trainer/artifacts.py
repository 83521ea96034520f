"""What a run leaves behind: the saved output's checks, provenance.json, metrics.json, the
training curves, the merged model, and the upload of it all to ``<storage root>/final/``.

``ModelFinetuner.save_model()`` / ``upload_final()`` call these; the layout is in finetuner.py's
module docstring.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.methods import parameter_counts, torch_dtype
from kubetune_trainer.models import architecture_of

if TYPE_CHECKING:
    from kubetune_trainer.storage import CheckpointStore

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
MERGED_SUBDIR = "merged"


def check_saved_adapter(out: Path, model: Any) -> None:
    """Refuse to ship an adapter file with empty tensors (the classic ZeRO-3 save trap)."""
    path = out / "adapter_model.safetensors"
    if not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        empty = [
            k for k in keys if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()
        ]
    if not keys or empty:
        raise RuntimeError(
            f"{path} is incomplete ({len(keys)} tensors, empty: {empty[:5]}): the adapter weights were not "
            "gathered before saving (DeepSpeed ZeRO-3 needs stage3_gather_16bit_weights_on_model_save)"
        )


def write_curves(out: Path, log_history: list[dict[str, Any]], title: str) -> Path | None:
    """log_history.json and training_curves.png in ``out``; the png's path (None when not drawn)."""
    from kubetune_trainer.plots import write_run_curves

    try:
        png = write_run_curves(out, log_history, title=title)
    except Exception as exc:  # a plot is not worth failing a finished training for
        log.warning("could not draw the training curves: %s", exc)
        return None
    log.info("training curves: %s (redraw with `kubetune plot %s`)", png, out)
    return png


def save_merged(
    out: Path, config: FinetuningConfig, base_model_path: str, precision: str | None, tokenizer: Any
) -> Path | None:
    """Reload base + adapter at full precision on CPU and merge (works after ZeRO-3 too).

    Returns the merged model's directory, or None when the method's adapter cannot be merged.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if config.method not in ("lora", "qlora"):
        log.warning(
            "merge_adapter: only LoRA adapters can be merged into the weights; skipped for %s",
            config.method,
        )
        return None
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch_dtype(precision or "fp32"))
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(str(out / MERGED_SUBDIR))
    tokenizer.save_pretrained(str(out / MERGED_SUBDIR))
    log.info("merged model saved to %s", out / MERGED_SUBDIR)
    return out / MERGED_SUBDIR


def write_provenance(
    out: Path,
    config: FinetuningConfig,
    model: Any,
    *,
    base_model_path: str | None,
    continued_from: str | None,
    run: dict[str, Any],
    data: Any,
    metrics: dict[str, Any],
    global_step: int | None,
) -> None:
    """provenance.json: base model, data fingerprints and statistics, config, metrics, versions."""
    import peft
    import torch
    import transformers

    trainable, total = parameter_counts(model)
    doc = {
        "kubetune_version": _version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base_model": {
            "name": config.model_name,
            "resolved_path": base_model_path,
            "revision": config.model_revision,
            "config_sha256": _file_sha256(Path(base_model_path or "") / "config.json"),
            "architecture": architecture_of(model),
        },
        "continued_from": continued_from,
        "run": run,
        "method": config.method,
        "parameters": {"trainable": trainable, "total": total},
        "datasets": dict(data.fingerprints) if data is not None else {},
        "data_stats": _stats_dict(data),
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
        "global_step": global_step,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def upload_output(store: CheckpointStore, out: Path, metrics: dict[str, Any]) -> str:
    """Upload ``out`` (not its checkpoints or scratch data) to ``<storage root>/final/`` and
    metrics.json next to it; returns the final URI."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".final-") as staging:
        for item in out.iterdir():
            if item.name in ("checkpoints", ".data") or item.name.startswith("."):
                continue
            target = Path(staging) / item.name
            if item.is_dir():
                shutil.copytree(item, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(item), str(target))
        store.upload_final(staging)
    store.write_json(METRICS_FILE, metrics)
    return str(store.final_uri)


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stats_dict(data: Any) -> Any:
    if data is None or not hasattr(data, "stats"):
        return None
    stats = data.stats
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    import dataclasses

    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return str(stats)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kubetune")
    except Exception:
        return "unknown"


# PEFT's peft_type in adapter_config.json -> the FineTuneJob method that writes it (LORA: lora or qlora,
# which the file cannot tell apart: the quantization was the base model's, not the adapter's).
_PEFT_METHODS = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}
ADAPTER_CONFIG = "adapter_config.json"


def saved_output(out: Path, method: str) -> dict[str, Any]:
    """What the saved output in ``out`` is, read back from the files (not from the config):
    ``method`` and, for LoRA/QLoRA, ``rank`` (r in adapter_config.json). The operator copies both
    into ``status.output``; an AdapterDeployment sizes vLLM's LoRA slots with the rank and refuses
    outputs its runtime cannot serve by the method.
    """
    cfg_file = Path(out) / ADAPTER_CONFIG
    if not cfg_file.is_file():
        # No PEFT adapter: a full fine-tune saves the whole model (config.json + weights).
        return {"method": "full"} if (Path(out) / "config.json").is_file() else {}
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # the adapter is saved; only the report loses the details
        log.warning("could not read %s for the termination report: %s", cfg_file, e)
        return {}
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type == "LORA":
        rank = cfg.get("r")
        doc: dict[str, Any] = {"method": "qlora" if method == "qlora" else "lora"}
        if isinstance(rank, int) and not isinstance(rank, bool):
            doc["rank"] = rank
        return doc
    return {"method": _PEFT_METHODS[peft_type]} if peft_type in _PEFT_METHODS else {}
