"""Two ways a training step does less work for the same numbers (torch).

* **No casts autocast undoes.** PEFT casts a LoRA layer's input to the adapter weights' dtype
  (fp32) before ``lora_A``; under mixed precision autocast then casts it straight back to bf16 or
  fp16 for the matmul. The round trip is exact (bf16 -> fp32 -> bf16 gives the same bits) and
  costs a copy of every adapted layer's activations each way: about 7% of a CPU step at hidden
  768 (docs/benchmarks.md). :func:`skip_input_casts_under_autocast` turns PEFT's cast off
  exactly while autocast is on (a forward pre-hook per LoRA layer), so a forward pass outside
  autocast (generation, evaluation, a merge) still casts as PEFT does.
* **No attention mask for right-padded causal batches.** A causal LM never lets a token attend
  to a later position, and right padding puts every pad after the row's real tokens, so the
  padding mask removes nothing the causal mask has not removed already; the pads' own outputs
  are never in the loss (their labels are -100). Without the mask, sdpa and flash-attention run
  their causal kernels (``is_causal``) instead of a masked one. :func:`drop_padding_mask`
  removes the mask from a batch when it is pure right padding; :func:`padding_mask_droppable`
  says for which models that is safe.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

# Attention implementations that treat a missing mask as causal (transformers builds no mask for
# them, or the kernel's is_causal). eager materialises the mask anyway: nothing to gain.
_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3", "packed_sdpa")
_HOOKED = "_kubetune_cast_hook"


def skip_input_casts_under_autocast(model: torch.nn.Module) -> int:
    """Hook every PEFT tuner layer of ``model`` (idempotent); returns how many were hooked."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # full fine-tuning installs without PEFT
        return 0

    def follow_autocast(module: Any, args: tuple) -> None:
        x = args[0] if args else None
        device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(device)

    hooked = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not hasattr(module, _HOOKED):
            setattr(module, _HOOKED, module.register_forward_pre_hook(follow_autocast))
            hooked += 1
    return hooked


def padding_mask_droppable(model: torch.nn.Module, method: str, trust_remote_code: bool) -> bool:
    """Whether right-padded batches of ``model`` train the same without their attention mask.

    Decoder-only models of transformers' own classes, trained with LoRA, QLoRA or full
    fine-tuning (prefix tuning feeds a KV cache, prompt tuning prepends tokens: both keep the
    mask), with an attention that is causal when given no mask. Remote code may read the mask
    for other purposes, so it keeps it.
    """
    if method not in ("lora", "qlora", "full") or trust_remote_code:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return getattr(config, "_attn_implementation", None) in _CAUSAL_WITHOUT_MASK


def is_right_padding(mask: torch.Tensor) -> bool:
    """True when every row of a 2-D 0/1 mask is ones then zeros (and the first column all ones)."""
    if mask.dim() != 2 or mask.shape[1] == 0:
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    expected = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths
    return bool(torch.equal(mask.bool(), expected)) and bool((lengths > 0).all())


def drop_padding_mask(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` without ``attention_mask`` when it is pure right padding; else unchanged."""
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or not is_right_padding(mask):
        return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def same_code(a: types.CodeType | None, b: types.CodeType | None) -> bool:
    """Whether two code objects are the same function body (bytecode, constants and names): how the
    fused modules recognise transformers' own code in a model's classes and their copies."""
    return (
        a is not None
        and b is not None
        and (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)
    )


def route_forward(
    model: torch.nn.Module,
    applies: Callable[[torch.nn.Module], bool],
    forward: Callable[..., Any],
    marker: str,
) -> int:
    """Make ``forward`` the forward of every module of ``model`` that ``applies`` to (once: a
    module already marked ``marker`` is skipped); returns how many were switched. The module's
    own hooks still run around it (it is still called as the module)."""
    switched = 0
    for module in model.modules():
        if not hasattr(module, marker) and applies(module):
            module.forward = types.MethodType(forward, module)
            setattr(module, marker, True)
            switched += 1
    return switched
