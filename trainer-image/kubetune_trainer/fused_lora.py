"""A LoRA linear layer as one autograd function: the adapter adds no full-size element-wise work.

PEFT computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the scaling
multiplies and the sum adds a tensor as large as the layer's output, forward and backward, and
autograd adds the two gradients of ``x`` (base and adapter path) in a third full-size pass. With
rank r much smaller than the layer's width, the adapter's matmuls are cheap and those passes
are a large share of its cost (about a sixth of a CPU step at hidden 768, docs/trainer.md).

:class:`LoraLinearFunction` does the same arithmetic with the element-wise work moved to the
rank-r side, the way Unsloth's ``fast_lora`` kernels do it in PyTorch: the scaling multiplies
the ``N x r`` intermediate, and ``addmm`` accumulates the adapter's product into the base
layer's output (forward) and into the input gradient (backward) inside the matmul. Everything
else is unchanged: same dtypes as autocast would pick, fp32 adapter gradients, dropout applied
to the adapter's input by PEFT's own dropout module.

:func:`fuse_lora_layers` switches it on for the layers where it computes the same function (a
PEFT ``lora.Linear`` over a plain ``nn.Linear``, vanilla LoRA, no bias on the adapter) and each
call falls back to PEFT's forward when anything unusual is asked of the layer (adapters
disabled or merged, several active adapters, per-row adapter names, no common compute dtype).
Not for DeepSpeed ZeRO-3, which gathers a layer's weights only when the layer itself is called.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune_trainer.fast_paths import route_forward

_FUSED = "_kubetune_fused_forward"


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + bias + (dropout(x) @ A.T * scaling) @ B.T`` with explicit gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        h = torch.mm(xd2, a.t()).mul_(scaling)  # N x r: the only element-wise work of the adapter
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        y.addmm_(h, b.t())
        ctx.save_for_backward(x2, None if x_dropped is None else xd2, h, w, a, b)
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xd2, h, w, a, b = ctx.saved_tensors
        need_x, need_xd, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dy = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        w_dtype, bias_dtype, a_dtype, b_dtype = ctx.param_dtypes
        grad_b = torch.mm(dy.t(), h).to(b_dtype) if need_b else None
        dh = torch.mm(dy, b).mul_(ctx.scaling)  # N x r
        grad_a = torch.mm(dh.t(), x2 if xd2 is None else xd2).to(a_dtype) if need_a else None
        grad_x = grad_xd = None
        if need_x or need_xd:
            grad_x = torch.mm(dy, w)
            if xd2 is None:
                grad_x.addmm_(dh, a)  # the adapter's share of dL/dx, summed inside the matmul
            else:  # through PEFT's dropout module, which autograd differentiates
                grad_xd = torch.mm(dh, a).view(*grad.shape[:-1], a.shape[-1]).to(ctx.x_dtype)
            grad_x = grad_x.view(*grad.shape[:-1], w.shape[-1]).to(ctx.x_dtype)
        grad_w = torch.mm(dy.t(), x2).to(w_dtype) if need_w else None
        grad_bias = dy.sum(0).to(bias_dtype) if need_bias else None
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, None, None


def fusable(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA linear layer this function computes exactly."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # full fine-tuning installs without PEFT
        return False
    if not isinstance(module, LoraLinear) or type(module.get_base_layer()) is not torch.nn.Linear:
        return False
    if getattr(module, "fan_in_fan_out", False) or getattr(module, "lora_variant", None):
        return False  # DoRA and the other variants have their own forward
    return not any(getattr(module, "lora_bias", {}).values())


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run the matmuls in; None when PEFT's own casts would differ."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype == weight.dtype == lora_a.dtype:
        return x.dtype
    return None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plain = not args and not kwargs and not self.disable_adapters and not self.merged
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    if plain and len(adapters) == 1:
        name = adapters[0]
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = _compute_dtype(x, base.weight, lora_a)
        if dtype is not None:
            dropout = self.lora_dropout[name]
            x_dropped = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
            return LoraLinearFunction.apply(
                x, x_dropped, base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]), dtype
            )
    return type(self).forward(self, x, *args, **kwargs)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every fusable LoRA layer of ``model`` through :class:`LoraLinearFunction`
    (idempotent); returns how many layers were switched."""
    return route_forward(model, fusable, _fused_forward, _FUSED)
