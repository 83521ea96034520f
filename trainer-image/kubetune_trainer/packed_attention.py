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

Either way, short bf16 sequences on CPU use sdpa's math kernel: torch's CPU flash-attention
kernel is slower there (``SHORT_BF16_CPU``). That is why unpacked bf16 training on CPU loads this
implementation too.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

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


def register() -> str:
    """Make ``attn_implementation="packed_sdpa"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # The mask transformers builds for batches without boundaries (padding, generation) is sdpa's.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def packing_attention(requested: str | None, device_type: str) -> str | None:
    """The attention implementation a packed training run loads the model with.

    What the user set wins. Otherwise flash_attention_2 on CUDA with flash-attn installed (the
    variable-length kernel), and ``packed_sdpa`` everywhere else.
    """
    if requested:
        return requested
    import importlib.util

    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register()
