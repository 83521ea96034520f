"""``init_adapter``: continue training an existing PEFT adapter instead of starting a new one.

The adapter (a directory, an ``s3://`` prefix, or a hub id) is loaded with PEFT as trainable
(``PeftModel.from_pretrained(..., is_trainable=True)``) onto the base model just loaded. Before
that, its method must be the configured one and, when it records its base model's architecture
(kubetune's provenance.json), that architecture must be the base model's; after loading, every
tensor of the adapter file must have arrived in the model with its saved value, so an adapter
made for other layers fails here instead of training a half-fresh adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.distributed import DistInfo
from kubetune_trainer.exit_codes import ConfigError

log = logging.getLogger(__name__)

# PEFT's peft_type for each adapter method.
PEFT_TYPES = {
    "lora": "LORA",
    "qlora": "LORA",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "ptuning": "P_TUNING",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_adapter_path(uri: str, dist: DistInfo) -> str:
    """A local directory for ``init_adapter`` (downloading ``s3://``), or a hub id as given."""
    from kubetune_trainer.models import download_model, looks_like_hub_id

    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    elif uri.startswith("s3://"):
        return download_model(uri, dist, marker=ADAPTER_CONFIG, field="init_adapter")
    p = Path(uri).expanduser()
    if p.is_dir():
        if not (p / ADAPTER_CONFIG).is_file():
            raise ConfigError(
                f"init_adapter {uri!r}: no {ADAPTER_CONFIG} in that directory; give the directory a training "
                "saved (its output_dir, or the final/ folder of a FineTuneJob)"
            )
        return str(p)
    if uri.startswith((".", "/", "~")) or not looks_like_hub_id(uri):
        raise ConfigError(
            f"init_adapter {uri!r}: directory not found; give an adapter directory, an s3:// URI or a hub id"
        )
    return uri


def check_adapter(config: FinetuningConfig, path: str, model: Any) -> None:
    """The adapter at ``path`` is of ``config.method`` and (when recorded) made for this base model."""
    from peft import PeftConfig

    try:
        peft_config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"init_adapter {config.init_adapter!r}: cannot read its {ADAPTER_CONFIG} ({exc})"
        ) from None
    found = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    want = PEFT_TYPES[config.method]
    if found != want:
        methods = [m for m, t in PEFT_TYPES.items() if t == found]
        hint = f"set method to {methods[0]!r}" if methods else "use an adapter of a method kubetune trains"
        raise ConfigError(
            f"init_adapter {config.init_adapter!r} is a {found} adapter, but method is {config.method!r} "
            f"({want}): {hint}, or start a new adapter without init_adapter"
        )
    recorded = _recorded_architecture(path)
    if recorded is None:
        log.warning(
            "init_adapter %s records no base model architecture (no kubetune provenance.json); "
            "its fit is checked when its weights load",
            config.init_adapter,
        )
        return
    from kubetune_trainer.models import architecture_of

    actual = architecture_of(model)
    differ = {k: (v, actual.get(k)) for k, v in recorded.items() if v is not None and actual.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {a!r} (base model: {b!r})" for k, (a, b) in differ.items())
        raise ConfigError(
            f"init_adapter {config.init_adapter!r} was trained on a different base model: {what}; "
            f"use the base model it was trained on (its provenance.json names it) as model_name"
        )


def _recorded_architecture(path: str) -> dict[str, Any] | None:
    provenance = Path(path) / "provenance.json"
    if not provenance.is_file():
        return None
    try:
        doc = json.loads(provenance.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    arch = (doc.get("base_model") or {}).get("architecture")
    return arch if isinstance(arch, dict) else None


def continue_adapter(config: FinetuningConfig, model: Any, dist: DistInfo) -> Any:
    """``model`` (the base just loaded) with the adapter ``config.init_adapter`` on it, trainable."""
    from peft import PeftModel, prepare_model_for_kbit_training

    assert config.init_adapter
    path = resolve_adapter_path(config.init_adapter, dist)
    check_adapter(config, path, model)
    if config.method == "qlora":  # as apply_method prepares a quantised base for a new adapter
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    except RuntimeError as exc:  # shape mismatches: an adapter for another model size
        raise ConfigError(
            f"init_adapter {config.init_adapter!r} does not fit the base model {config.model_name!r} ({exc}); "
            "use the base model it was trained on"
        ) from None
    _check_loaded(config, path, peft_model)
    log.info("continuing adapter %s (%s)", config.init_adapter, PEFT_TYPES[config.method])
    return peft_model


def _check_loaded(config: FinetuningConfig, path: str, model: Any) -> None:
    """Every tensor of the adapter file is in the model, with its saved value."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():  # a hub id, or the legacy .bin format: PEFT reported what it loaded
        return
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    loaded = get_peft_model_state_dict(model)
    missing = sorted(k for k in saved if k not in loaded)
    wrong = sorted(
        k
        for k in saved
        if k in loaded and not torch.equal(loaded[k].detach().cpu().to(saved[k].dtype), saved[k])
    )
    if missing or wrong:
        raise ConfigError(
            f"init_adapter {config.init_adapter!r}: {len(missing) + len(wrong)} of {len(saved)} adapter tensors "
            f"did not load into {config.model_name!r} (e.g. {(missing or wrong)[0]}); was it trained on a "
            "different base model?"
        )
