"""Attention for packed rows without flash-attention: sdpa one example at a time.

A packed batch is one row holding several examples back to back (data/collate.py). transformers'
sdpa path turns the restarting ``position_ids`` into one block-diagonal mask over the whole row,
and sdpa then computes every query against every key of the row: the cost grows with the square
of the *row* length, most of it for pairs the mask throws away, and a masked sdpa cannot use the
causal fast path. flash-attention avoids that with variable-length kernels, but it needs CUDA and
the flash-attn package.

``packed_sdpa`` is that variable-length attention built from plain sdpa: the packing collator
passes the example boundaries (``cu_seq_lens_q``, the same keyword flash-attention reads), and
each example runs through sdpa on its own with ``is_causal=True``, so an example of s tokens costs
s² and nothing crosses examples. Batches without boundaries (padded batches, generation) go to
transformers' sdpa with its mask.

Either way, bf16 training on CPU takes the fastest kernel for the shape, which is why unpacked
bf16 training on CPU loads this implementation too:

* on CPUs with AMX, kubetune's own causal backward (:mod:`kubetune_trainer.kernels`) after torch's
  flash-attention forward, at every length: it computes the lower triangle only, 0.2-0.6x the
  time of torch's backward (docs/benchmarks.md);
* where that kernel is not available, short sequences use sdpa's math kernel: torch's CPU flash-attention kernel is slower there
  (``SHORT_BF16_CPU``);
* with small heads (``FP32_BACKWARD_MAX_HEAD_DIM``) the flash kernel's backward runs in fp32
  (:class:`CausalFlashFp32Backward`): its bf16 backward is about twice as slow there as the same
  kernel in fp32, casts included (head dim 32, 192-700 tokens; docs/trainer.md). The forward stays
  bf16; the gradients are as close to an fp64 reference as the bf16 backward's, or closer.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from kubetune_trainer.kernels import FlashForward

#: The ``attn_implementation`` name this module registers with transformers.
PACKED_SDPA = "packed_sdpa"


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per example of a packed row (``cu_seq_lens_q`` given), else transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        if _plain_causal_bf16_training(module, query, key, attention_mask, kwargs):
            return _causal_bf16(query, key, value, kwargs.get("scaling")), None
        with _kernel_for(query):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    edges = bounds.tolist() if torch.is_tensor(bounds) else list(bounds)
    lengths = [int(b) - int(a) for a, b in itertools.pairwise(edges)]
    # split, not slicing: the backward of a split is one concatenation, where each slice's
    # backward would add a zero-filled gradient of the whole row.
    outputs = []
    for q, k, v in zip(
        query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2), strict=True
    ):
        if _plain_causal_bf16_training(module, q, k, None, kwargs):
            outputs.append(_causal_bf16(q, k, v, kwargs.get("scaling")))
            continue
        with _kernel_for(q):
            outputs.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
    return torch.cat(outputs, dim=1), None  # [1, tokens, heads, head_dim], like sdpa's output


#: Below this many tokens torch's CPU flash-attention kernel is slower in bf16 than its math kernel
#: (about 2x at 64-128 tokens, break-even near 200; measured with torch 2.15 on AMX).
SHORT_BF16_CPU = 192


def _kernel_for(query: torch.Tensor) -> Any:
    """sdpa's math kernel for short bf16 examples on CPU, torch's own choice otherwise."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.shape[2] < SHORT_BF16_CPU:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


#: Head dims up to this one get torch's CPU flash-attention backward in fp32 for bf16 training: at
#: head dim 32 the bf16 backward takes 1.6-2.7x as long (192-700 tokens, torch 2.15 on AMX), at 64
#: it is 1.1-1.4x faster than fp32, so larger heads keep it.
FP32_BACKWARD_MAX_HEAD_DIM = 32


class CausalFlashFp32Backward(FlashForward):
    """Causal attention: torch's CPU flash kernel forward in the inputs' dtype, backward in fp32."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        query, key, value, out, lse = ctx.saved_tensors
        f32 = [t.float() for t in (grad, query, key, value, out)]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *f32, lse, 0.0, True, scale=ctx.scale
        )
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None


def _plain_causal_bf16_training(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, kwargs: dict[str, Any]
) -> bool:
    """Plain causal self-attention (no mask, dropout or variant) being trained in bf16 on CPU."""
    return (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad)
        and mask is None
        and query.shape[2] == key.shape[2]
        and query.shape[-1] == key.shape[-1]
        and not kwargs.get("dropout")
        and kwargs.get("is_causal") is not False
        and getattr(module, "is_causal", True)
        and all(kwargs.get(k) is None for k in ("sliding_window", "softcap", "position_bias", "s_aux"))
        and (_own_kernel_applies(query) or _fp32_backward_applies(query))
    )


def _own_kernel_applies(query: torch.Tensor) -> bool:
    from .kernels import causal_attention_backward_op

    return query.shape[-1] % 2 == 0 and causal_attention_backward_op() is not None


def _fp32_backward_applies(query: torch.Tensor) -> bool:
    return query.shape[2] >= SHORT_BF16_CPU and query.shape[-1] <= FP32_BACKWARD_MAX_HEAD_DIM


def _causal_bf16(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Any) -> torch.Tensor:
    """kubetune's CPU kernel where it loaded, else torch's flash kernel with an fp32 backward."""
    from .kernels import CausalAttention

    function = CausalAttention if _own_kernel_applies(query) else CausalFlashFp32Backward
    out = function.apply(query, key, value, scale)
    return out.transpose(1, 2).contiguous()  # [batch, tokens, heads, head_dim], like sdpa_attention_forward


def register() -> str:
    """Make ``attn_implementation="packed_sdpa"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # The mask transformers builds for batches without boundaries (padding, generation) is sdpa's.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def flash_attn_installed() -> bool:
    """Whether the flash-attn package (transformers' ``flash_attention_2``) can be imported."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def packing_attention(requested: str | None, device_type: str) -> str | None:
    """The attention implementation a packed training run loads the model with.

    What the user set wins. Otherwise flash_attention_2 on CUDA with flash-attn installed (the
    variable-length kernel), and ``packed_sdpa`` everywhere else.
    """
    if requested:
        return requested
    if device_type == "cuda" and flash_attn_installed():
        return "flash_attention_2"
    return register()
