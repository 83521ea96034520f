"""Llama-style RMSNorm as one autograd function: the same output, fewer passes over memory.

transformers' ``LlamaRMSNorm`` (and its copies in Mistral, Qwen2, Qwen3 ...) computes
``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`` with separate tensor ops,
and autograd keeps the fp32 intermediates and walks back through each: about ten full-size fp32
passes per norm in a training step, two norms per layer. :class:`RMSNormFunction` computes the
forward exactly as transformers does (bit-identical output; in bf16 on CPUs with kubetune's
kernels, one C++ pass that can differ by one bf16 step) and writes the backward out in
closed form (``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * weight``), saving only
the input and one fp32 scalar per row. About 0.65x the time of the original, forward and
backward, on a (3200 x 768) bf16 input (docs/trainer.md).

:func:`fuse_rms_norms` switches it on only for modules whose ``forward`` is transformers' own
Llama RMSNorm code (compared by bytecode), so a norm that differs in any way (Gemma's
``1 + weight``, a norm with a bias) keeps its own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from kubetune_trainer.fast_paths import route_forward, same_code
from kubetune_trainer.kernels import applies as kernels_apply

_FUSED = "_kubetune_fused_norm"


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x**2) + eps))`` in fp32, cast back, with a closed-form backward.

    bf16 on CPUs where kubetune's kernels load takes their one-pass forward and backward
    (kernels/rms_norm.cpp: the same roundings, the sum of squares in another order, so an output
    can differ from transformers' by one bf16 step); the weight's gradient (full fine-tuning)
    always comes from the tensor code here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.kernel = _kernel_applies(x, weight)
        if ctx.kernel:
            y, rstd = torch.ops.kubetune.rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, rstd = ctx.saved_tensors
        if ctx.kernel and not ctx.needs_input_grad[1]:
            return torch.ops.kubetune.rms_norm_backward(grad, x, weight, rstd), None, None
        xhat = x.float() * rstd  # a new tensor: safe to change in place below
        grad_weight = None
        if ctx.needs_input_grad[1]:  # full fine-tuning trains the norm's weight
            rows = tuple(range(grad.dim() - 1))
            grad_weight = (grad.float() * xhat.to(x.dtype).float()).sum(rows).to(weight.dtype)
        g = (grad * weight).float()  # a new tensor too
        dot = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return kernels_apply(x, weight)


def _llama_norm_code() -> types.CodeType | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return LlamaRMSNorm.forward.__code__


def fusable(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` is transformers' Llama RMSNorm code, with its attributes."""
    own = getattr(getattr(type(module), "forward", None), "__code__", None)
    if not hasattr(module, "variance_epsilon"):
        return False
    return isinstance(getattr(module, "weight", None), torch.Tensor) and same_code(own, _llama_norm_code())


def _fused_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Route every fusable RMSNorm of ``model`` through :class:`RMSNormFunction` (idempotent);
    returns how many were switched."""
    return route_forward(model, fusable, _fused_forward, _FUSED)
