"""Elastic weight consolidation (Kirkpatrick et al., 2017) for continual learning.

Before training on a new task, the diagonal of the (empirical) Fisher information of the
trainable parameters is estimated on replay data from the earlier tasks; training then adds

    lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

to the loss, so parameters that mattered for the old tasks move less. This penalty is the
one custom loss term in kubetune (PEFT and transformers have no EWC); it is applied by
``KubetuneTrainer.compute_loss`` and leaves optimisation to the Trainer.

With LoRA the trainable parameters are the adapter's, anchored at their values when
training starts (zero update for a fresh adapter: the penalty keeps the model close to the
base model's behaviour on the replay data).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class EWCPenalty:
    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], strength: float):
        self.fisher = fisher
        self.anchor = anchor
        self.strength = strength

    @classmethod
    def estimate(
        cls, model: torch.nn.Module, examples: Sequence[dict[str, list[int]]], strength: float
    ) -> EWCPenalty:
        """Average squared gradients of the loss on ``examples`` (one example per backward pass,
        which is what makes it the empirical Fisher rather than the squared mean gradient)."""
        if not examples:
            raise ValueError("EWC needs at least one replay example to estimate the Fisher information")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("EWC: the model has no trainable parameters")
        device = next(iter(params.values())).device
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the deterministic model
        try:
            for ex in examples:
                model.zero_grad(set_to_none=True)
                ids = torch.tensor([ex["input_ids"]], device=device)
                labels = torch.tensor([ex["labels"]], device=device)
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().float() ** 2
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        for n in fisher:
            fisher[n] /= len(examples)
        anchor = {n: p.detach().clone().float() for n, p in params.items()}
        total = sum(float(f.sum()) for f in fisher.values())
        log.info(
            "EWC: Fisher estimated on %d replay examples (trace %.3g), lambda=%g",
            len(examples),
            total,
            strength,
        )
        return cls(fisher, anchor, strength)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        terms: list[torch.Tensor] = []
        for n, p in model.named_parameters():
            f = self.fisher.get(n)
            if f is None:
                continue
            if f.device != p.device:  # the Trainer may move the model after estimation
                self.fisher[n] = f = f.to(p.device)
                self.anchor[n] = self.anchor[n].to(p.device)
            terms.append((f * (p.float() - self.anchor[n]) ** 2).sum())
        if not terms:
            raise RuntimeError("EWC: none of the estimated parameters is in the model being trained")
        return 0.5 * self.strength * torch.stack(terms).sum()

    def state(self) -> dict[str, Any]:
        return {"strength": self.strength, "parameters": len(self.fisher)}
