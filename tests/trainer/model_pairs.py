"""Helpers for the tests that train a model and its fused copy side by side."""

from __future__ import annotations

import torch


def step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One forward and backward of a causal LM on ``ids`` (labels = ids); returns the loss and
    leaves the gradients on the parameters."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss


def grad_pairs(
    model: torch.nn.Module, fused: torch.nn.Module
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, model's gradient, fused copy's gradient)`` for every parameter, in order."""
    return [
        (name, p.grad, q.grad)
        for (name, p), (_, q) in zip(model.named_parameters(), fused.named_parameters(), strict=True)
    ]
