"""Fine-tuning methods: how the base model is loaded and which PEFT config wraps it.

Every method goes through PEFT (or, for ``full``, trains the model as is); nothing here
implements a layer. ``check_supported`` runs before anything is downloaded or loaded, so a
job that cannot run on this machine (QLoRA without CUDA / bitsandbytes) fails in
milliseconds with exit code 4 rather than after minutes of work.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError, UnsupportedHardwareError
from kubetune_trainer.settings import VIRTUAL_TOKEN_METHODS

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig

log = logging.getLogger(__name__)

# Attention projection names of common architectures, in the order we look for them:
# Llama / Mistral / Qwen / Gemma; Phi-3; GPT-NeoX / Falcon / BLOOM; MPT; BERT-style; GPT-2 (Conv1D).
_ATTENTION_NAME_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("qkv_proj", "o_proj"),
    ("query_key_value", "dense"),
    ("Wqkv", "out_proj"),
    ("query", "key", "value"),
    ("c_attn", "c_proj"),
)

ResolvedPrecision = Literal["bf16", "fp16", "fp32"]


def check_supported(config: FinetuningConfig) -> None:
    """Fail fast when the method cannot run here (call before loading anything)."""
    if config.method != "qlora":
        return
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedHardwareError(
            "method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is visible here; "
            "run on a GPU node, or use method 'lora' on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedHardwareError(
            "method 'qlora' needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes` (the trainer image has it), or use method 'lora'"
        )


def resolve_precision(config: FinetuningConfig) -> ResolvedPrecision:
    """``auto``: see :func:`kubetune_trainer.precision.auto_precision` (shared with the server)."""
    import torch

    from .precision import auto_precision

    if config.precision != "auto":
        if config.precision == "fp16" and not torch.cuda.is_available():
            raise UnsupportedHardwareError(
                "precision 'fp16' needs a CUDA GPU (mixed precision with loss scaling); "
                "use precision 'auto' or 'fp32' on CPU"
            )
        return config.precision
    return auto_precision("cuda" if torch.cuda.is_available() else "cpu")


#: attn_implementation values whose kernels attend packed rows one example at a time natively
#: (variable-length flash attention). sdpa and flex are correct on packed rows too, but compute
#: the long row's masked square, so they do not make packing the faster layout.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def resolve_packing(config: FinetuningConfig) -> bool:
    """``packing`` unset (auto): pack only where that is the faster layout.

    That is CUDA with a variable-length attention kernel (flash-attn installed, or set in
    attn_implementation): each packed example costs what it would alone, and no padding is
    computed. Everywhere else length-grouped padded batches are faster: on CPU packed rows
    measured 0.61-0.98x the default's tokens/s (docs/benchmarks.md), because grouping leaves
    almost no padding and per-example attention adds work. Virtual-token methods never pack.
    """
    if config.packing is not None:
        return config.packing
    if config.method in VIRTUAL_TOKEN_METHODS or config.precision == "fp32":
        return False  # flash-attn computes in fp16/bf16 only; auto on CUDA is one of those
    import torch

    if not torch.cuda.is_available():
        return False
    if config.attn_implementation is not None:
        return config.attn_implementation in VARLEN_ATTENTION
    from kubetune_trainer.packed_attention import flash_attn_installed

    return flash_attn_installed()


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def model_load_kwargs(config: FinetuningConfig, precision: ResolvedPrecision) -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

    PEFT methods keep the frozen base in the training precision (half the memory; PEFT
    keeps adapter weights in fp32). Full fine-tuning loads fp32 master weights and lets
    mixed precision (autocast or DeepSpeed) handle the half-precision compute.
    ``model_dtype`` (a FineTuneJob's baseModel.dtype), when not auto, overrides both.
    """
    import torch

    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.model_revision:
        kwargs["revision"] = config.model_revision
    attention = config.attn_implementation
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if resolve_packing(config):  # variable-length attention, so packed rows cost no cross-example work
        from .packed_attention import packing_attention

        attention = packing_attention(attention, device)
    elif attention is None and device == "cpu" and precision == "bf16" and not config.trust_remote_code:
        # sdpa with the faster kernel for short bf16 batches (transformers' own model classes all
        # take a registered attention function; remote code may not, so it keeps the default)
        from .packed_attention import register

        attention = register()
    if attention:
        kwargs["attn_implementation"] = attention
    if config.model_dtype != "auto":  # baseModel.dtype: the user's choice wins
        kwargs["dtype"] = getattr(torch, config.model_dtype)
    elif config.method == "full":
        kwargs["dtype"] = torch_dtype("fp32")
    else:
        kwargs["dtype"] = torch_dtype(precision)
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        q = config.quantization
        compute = precision if q.compute_dtype == "auto" else q.compute_dtype
        if q.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.quant_type,
                bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(compute),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # Each process puts its quantised copy on its own GPU (DDP); bitsandbytes needs an explicit map.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Leaf names (``q_proj``) of Linear-like layers, excluding the output embedding."""
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

    linear_types: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:  # bitsandbytes layers are Linear subclasses already; quantised 4-bit ones too
        import bitsandbytes as bnb

        linear_types = (*linear_types, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, linear_types) and module is not output:
            names.add(full_name.rsplit(".", 1)[-1])
    return names


def detect_lora_targets(model: torch.nn.Module) -> list[str]:
    """The attention projections of this architecture (what LoRA adapts by default).

    Looks at the model's actual Linear layers, so renamed or custom architectures work;
    falls back to PEFT's per-architecture table, then to every Linear layer.
    """
    present = linear_module_names(model)
    for names in _ATTENTION_NAME_SETS:
        found = [n for n in names if n in present]
        if len(found) >= 2 or (found and len(names) == 1):
            return found
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if mapped:
        return list(mapped)
    if present:
        return sorted(present)
    raise ConfigError(
        f"could not find Linear layers to adapt in this {model_type or type(model).__name__} model; "
        "set lora.target_modules explicitly"
    )


def build_peft_config(config: FinetuningConfig, model: Any) -> PeftConfig | None:
    """The PEFT config for ``config.method`` (None for full fine-tuning)."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    method = config.method
    if method == "full":
        return None
    if method in ("lora", "qlora"):
        lo = config.lora
        targets: list[str] | str = lo.peft_target_modules or detect_lora_targets(model)
        if isinstance(targets, list):
            missing = [t for t in targets if t not in linear_module_names(model) and "." not in t]
            if missing:
                raise ConfigError(
                    f"lora.target_modules {missing} match no Linear layer of this model; "
                    f"available: {sorted(linear_module_names(model))}"
                )
        log.info("LoRA r=%d alpha=%s on %s", lo.r, lo.alpha, targets)
        return LoraConfig(
            r=lo.r,
            lora_alpha=lo.alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r: floats work
            lora_dropout=lo.dropout,
            target_modules=targets,
            bias=lo.bias,
            use_rslora=lo.use_rslora,
            task_type=TaskType.CAUSAL_LM,
        )
    vt = config.virtual_tokens
    if method == "prefix":
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=vt.num_virtual_tokens,
            prefix_projection=vt.prefix_projection,
            encoder_hidden_size=vt.encoder_hidden_size or model.config.hidden_size,
        )
    if method == "prompt":
        if vt.prompt_init_text:
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=vt.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=vt.prompt_init_text,
                tokenizer_name_or_path=config.model_name,
            )
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=vt.num_virtual_tokens)
    if method == "ptuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=vt.num_virtual_tokens,
            encoder_hidden_size=vt.encoder_hidden_size or model.config.hidden_size,
            encoder_reparameterization_type=PromptEncoderReparameterizationType(
                vt.encoder_reparameterization_type
            ),
        )
    raise ConfigError(f"unknown method {method!r}")  # pragma: no cover - the config validates it


def apply_method(config: FinetuningConfig, model: Any) -> Any:
    """Wrap the loaded base model for training with ``config.method``; returns the model to train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        # Casts norms to fp32, freezes the base and (optionally) enables input grads for checkpointing.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing and config.uses_peft:
        # Frozen embeddings give checkpointed blocks inputs without grad: make them require grad.
        model.enable_input_require_grads()
    peft_config = build_peft_config(config, model)
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return get_peft_model(model, peft_config)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 aware: uses ds_numel when sharded)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
