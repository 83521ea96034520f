"""The loaded base model, its tokenizer and its LoRA adapters (a PEFT model with several adapters).

Only the engine's worker thread calls the mutating methods once serving has started.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.exit_codes import ConfigError

from .config import BASE_ROW
from .sources import AdapterInfo, SourceError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible here; use device 'cpu' or 'auto'")
    return dev


def available_cpus() -> int:
    """CPUs this process may use: affinity, capped by a cgroup v2 CPU limit (a pod's limits.cpu)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: the precision training's ``precision: auto`` picks on this device."""
    if dtype != "auto":
        return _DTYPES[dtype]
    from kubetune_trainer.precision import auto_precision

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[auto_precision(device.type)]


class LoadedModel:
    """Base model + tokenizer; adapters are added to one ``PeftModel`` as they are loaded."""

    def __init__(self, base: Any, tokenizer: Any, *, device: torch.device, max_model_len: int):
        self.base = base
        self.model = base  # becomes a PeftModel with the first adapter
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = max_model_len
        self.vocab_size = int(base.get_input_embeddings().weight.shape[0])
        self.adapters: dict[str, AdapterInfo] = {}
        eos: set[int] = set()
        for source in (getattr(base.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(x) for x in source)
        self.eos_ids = frozenset(eos)
        self.pad_id = int(tokenizer.pad_token_id)

    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        cpu_threads: int | None = None,
        revision: str | None = None,
    ) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = resolve_device(device)
        if dev.type == "cpu":
            # torch defaults to one thread per host core; in a pod with a CPU limit that oversubscribes
            # the quota and the threads spin-wait on each other.
            torch.set_num_threads(cpu_threads or available_cpus())
        try:
            # revision picks a hub commit; transformers ignores it for a local directory.
            tokenizer = AutoTokenizer.from_pretrained(
                path, revision=revision, trust_remote_code=trust_remote_code
            )
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype(dtype, dev), revision=revision, trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise SourceError(f"cannot load the base model from {path}: {exc}") from None
        base.to(dev).eval()  # type: ignore[arg-type]  # transformers wraps .to(); torch accepts a device
        if tokenizer.pad_token_id is None:
            # Batched generation pads prompts; the pad positions are masked, so any id works.
            tokenizer.pad_token = tokenizer.eos_token
        # Fast tokenizers mutate their Rust state when truncation/padding settings change; doing it
        # once here means later encodes (event loop) and decodes (worker) only read it.
        tokenizer("warm up")
        limit = _model_limit(base, tokenizer)
        if max_model_len is not None and max_model_len > limit:
            raise ConfigError(
                f"max_model_len={max_model_len} exceeds what the model supports ({limit} positions): "
                f"set max_model_len to at most {limit}"
            )
        return cls(base, tokenizer, device=dev, max_model_len=max_model_len or limit)

    # ------------------------------------------------------------------------------ adapters

    @property
    def is_peft(self) -> bool:
        return self.model is not self.base

    def has(self, model: str) -> bool:
        return model == BASE_ROW or model in self.adapters

    def add_adapter(self, name: str, info: AdapterInfo, *, replace: bool = False) -> None:
        """Load the adapter at ``info.path`` under ``name`` (replacing an existing one if asked)."""
        from peft import PeftModel
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(info.path), device="cpu")
        self._check_fits(name, info.path, weights)
        if name in self.adapters:
            if not replace:
                raise ValueError(f"adapter {name!r} is already loaded")
            self.remove_adapter(name)
        try:
            if not self.is_peft:
                self.model = PeftModel.from_pretrained(
                    self.base, str(info.path), adapter_name=name, is_trainable=False
                )
            else:
                self.model.load_adapter(str(info.path), adapter_name=name, is_trainable=False)
        except Exception as exc:
            if self.is_peft and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise SourceError(f"adapter {name!r} from {info.path} could not be loaded: {exc}") from exc
        self.model.to(self.device).eval()
        self.adapters[name] = info

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        del self.adapters[name]
        if self.adapters:
            self.model.delete_adapter(name)
        else:
            # PEFT cannot hold zero adapters: take the LoRA layers out and serve the plain model.
            self.base = self.model.unload()
            self.model = self.base
        log.info("adapter %s unloaded", name)

    def _check_fits(self, name: str, path: Path, weights: dict[str, Any]) -> None:
        """Fail before touching the model if the adapter was trained for another architecture."""
        modules = dict(self.base.named_modules())
        for key, tensor in weights.items():
            if ".lora_A" not in key and ".lora_B" not in key:
                continue
            module_name = key.removeprefix("base_model.model.").split(".lora_")[0]
            module = modules.get(module_name)
            if module is None:
                raise SourceError(
                    f"adapter {name!r} ({path}) adapts module {module_name!r}, which the base model does not "
                    "have: it was trained for a different base model"
                )
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if in_f is None or out_f is None or tensor.dim() != 2:
                continue
            bad = (".lora_A" in key and tensor.shape[1] != in_f) or (
                ".lora_B" in key and tensor.shape[0] != out_f
            )
            if bad:
                raise SourceError(
                    f"adapter {name!r} ({path}): {key} has shape {tuple(tensor.shape)} but module "
                    f"{module_name!r} is {in_f}->{out_f}: it was trained for a different base model"
                )

    @contextlib.contextmanager
    def activated(self, model: str) -> Iterator[None]:
        """Make ``model`` the active adapter (the switching baselines; mixed batches never switch)."""
        if not self.is_peft:
            yield
        elif model == BASE_ROW:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(model)
            yield


def _model_limit(model: Any, tokenizer: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    candidates = [x for x in (limit, tok_limit) if isinstance(x, int) and 0 < x < 10_000_000]
    return min(candidates) if candidates else 2048
