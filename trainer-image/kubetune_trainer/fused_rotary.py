"""Llama's rotary position embedding as one bf16 op on CPU: the same numbers, fewer passes.

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` (and the same for the keys), op by
op: about five full-size passes over the queries and keys forward, five backward. On CPUs where
kubetune's kernels load, :class:`RotaryFunction` does each way in one pass (kernels/rotary.cpp)
with torch's roundings, so queries, keys and gradients are bit-identical.

transformers' attention classes call their modeling file's module-level
``apply_rotary_pos_emb``; there is no per-layer hook for it. :func:`fuse_rotary` therefore
replaces that function in the modeling files of ``model``'s attention classes, as Liger Kernel
does, and only where both it and that file's ``rotate_half`` are transformers' Llama code
(compared by bytecode). The replacement calls the original for anything but bf16 on CPU (CUDA,
fp32, other layouts), so other models in the process compute exactly what they did.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from kubetune_trainer.fast_paths import same_code
from kubetune_trainer.kernels import applies as kernels_apply

_FUSED = "_kubetune_fused_rotary"


def _rotate(op: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``op`` over ``x`` [B, H, L, D] in its projection's memory layout [B, L, H, D]."""
    return op(x.transpose(1, 2), cos, sin).transpose(1, 2)


class RotaryFunction(torch.autograd.Function):
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` in bf16, cos and sin
    ``[B or 1, L, D]`` (constants: no gradient)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        ctx.save_for_backward(cos, sin)
        op = torch.ops.kubetune.rotary_forward
        return _rotate(op, q, cos, sin), _rotate(op, k, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> Any:
        cos, sin = ctx.saved_tensors
        op = torch.ops.kubetune.rotary_backward
        return _rotate(op, grad_q, cos, sin), _rotate(op, grad_k, cos, sin), None, None


def _kernel_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> bool:
    if dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    if cos.requires_grad or sin.requires_grad or q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1]:
        return False
    if cos.shape[1] != q.shape[2] or cos.shape[0] not in (1, q.shape[0]):
        return False
    if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        return False
    return kernels_apply(q, k, cos, sin)


def _code(function: Any) -> types.CodeType | None:
    """The code of a function, or of the function transformers wrapped as a hub-kernel module."""
    if isinstance(function, types.FunctionType):
        return function.__code__
    forward = getattr(type(function), "forward", None)
    code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None)
    if code is None or closure is None or "func" not in code.co_freevars:
        return None
    return _code(closure[code.co_freevars.index("func")].cell_contents)


def fusable(modeling: types.ModuleType) -> bool:
    """Whether a modeling file's ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's code."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:
        return False
    own = getattr(modeling, "apply_rotary_pos_emb", None)
    own = getattr(own, _FUSED, own)  # already switched: judge the original
    reference = getattr(
        llama.apply_rotary_pos_emb, _FUSED, llama.apply_rotary_pos_emb
    )  # Llama's own, fused or not
    return same_code(_code(own), _code(reference)) and same_code(
        _code(getattr(modeling, "rotate_half", None)), _code(llama.rotate_half)
    )


def _fused(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        if _kernel_applies(q, k, cos, sin, unsqueeze_dim):
            return RotaryFunction.apply(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, _FUSED, original)
    return apply_rotary_pos_emb


def fuse_rotary(model: torch.nn.Module) -> int:
    """Route the rotary embedding of ``model``'s attention classes through :class:`RotaryFunction`
    (idempotent); returns how many modeling files were switched."""
    switched = 0
    for name in sorted({type(m).__module__ for m in model.modules()}):
        modeling = sys.modules.get(name)
        if modeling is None or hasattr(getattr(modeling, "apply_rotary_pos_emb", None), _FUSED):
            continue
        if fusable(modeling):
            modeling.apply_rotary_pos_emb = _fused(modeling.apply_rotary_pos_emb)  # type: ignore[attr-defined]
            switched += 1
    return switched
