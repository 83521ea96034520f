"""Llama's gated MLP with its SwiGLU as one bf16 op on CPU: the same numbers, fewer passes.

transformers' ``LlamaMLP`` (and its copies in Mistral, Qwen2, Qwen3 ...) computes
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. In a training step torch runs the SwiGLU in
between as five full-size passes (silu, the product, the product's two gradients, silu's
gradient) over tensors of the MLP's width, the widest activations of the layer, and keeps
``silu(gate)`` alive for the backward. On CPUs where kubetune's kernels load, :class:`SwiGLUFunction`
does it in one pass each way (kernels/swiglu.cpp) with torch's roundings, so the output and the
gradients are bit-identical, and keeps only ``gate`` and ``up``.

:func:`fuse_swiglu_mlps` switches it on only for modules whose ``forward`` is transformers' own
Llama MLP code (compared by bytecode) with a SiLU activation; each call falls back to that code
for anything but bf16 on CPU.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from kubetune_trainer.fast_paths import route_forward, same_code
from kubetune_trainer.kernels import applies as kernels_apply

_FUSED = "_kubetune_fused_mlp"


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` in bf16 with kubetune's one-pass forward and backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.ops.kubetune.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        gate, up = ctx.saved_tensors
        return torch.ops.kubetune.swiglu_backward(grad, gate, up)


def _kernel_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.shape == up.shape and kernels_apply(gate, up)


def _llama_mlp_code() -> types.CodeType | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return None
    return LlamaMLP.forward.__code__


def _is_silu(act: Any) -> bool:
    if isinstance(act, torch.nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return type(act) is SiLUActivation


def fusable(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` is transformers' Llama MLP code, with a SiLU activation."""
    own = getattr(getattr(type(module), "forward", None), "__code__", None)
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    return _is_silu(module.act_fn) and same_code(own, _llama_mlp_code())


def _fused_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)  # gate before up, as the original: dropout draws in the same order
    up = self.up_proj(x)
    hidden = SwiGLUFunction.apply(gate, up) if _kernel_applies(gate, up) else self.act_fn(gate) * up
    return self.down_proj(hidden)


def fuse_swiglu_mlps(model: torch.nn.Module) -> int:
    """Route every fusable MLP of ``model`` through :class:`SwiGLUFunction` (idempotent); returns how
    many were switched."""
    return route_forward(model, fusable, _fused_forward, _FUSED)
