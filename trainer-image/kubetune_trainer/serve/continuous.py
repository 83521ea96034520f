"""Continuous batching: the running batch, its KV cache, and one decoding step at a time (torch).

transformers' own continuous batching (``generate_batch`` / ``init_continuous_batching``) packs
every request into one flat sequence over a paged cache; PEFT's mixed-adapter LoRA needs one
batch row per request (``adapter_names`` selects rows along the batch dimension) and our rows
need their own samplers, grammars and stop strings, so the scheduler here is our own, over the
model's plain forward pass and a ``DynamicCache``:

* **Join.** Rows that arrive while others run are prefilled together (left-padded, with their
  own cache), their first token is chosen from the prefill's last logits, and their cache is
  concatenated to the running one along the batch dimension (the shorter side left-padded
  with masked zeros). From the next step on they decode with everyone else.
* **Step.** One forward pass of one token per row: ``adapter_names`` (one per row, PEFT's
  ``"__base__"`` for the base model) mixes adapters in the step, the 2D attention mask gains a
  column, each row's position advances by one. Plain greedy rows take one vectorised argmax;
  rows that sample, report log-probs or follow a grammar go through their :class:`RowChooser`.
* **Leave.** A row that ends (EOS, stop string, ``max_tokens``, cancelled) is answered at once
  and its row of the cache is dropped (``index_select``); leading columns that only padding
  uses any more are cut off, so the cache is as wide as the longest live row.

Greedy tokens are those of ``generate()``: the same positions (``cumsum`` of the mask), the
same masking of padding, the same cache layout per row.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .decoding import RowChooser, RowText
from .rows import Row


class UnsupportedModelError(ValueError):
    """The model's cache cannot be split and joined per row (the message says what to use)."""


def _plain(layer: object) -> bool:
    return isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers (all plain DynamicLayers: RunningBatch checks that when it starts)."""
    return cache.layers


class _Live:
    """A row in the running batch: its text tracker and, if it needs one, its chooser."""

    __slots__ = ("chooser", "row", "text")

    def __init__(self, row: Row, tokenizer: Any, eos_ids: frozenset[int]):
        self.row = row
        self.text = RowText(row, tokenizer, eos_ids)
        self.chooser = RowChooser(self.text) if RowChooser.needed(row) else None


class RunningBatch:
    """The sequences being generated together, with their KV cache, mask and positions."""

    def __init__(self, lm: Any):
        self.lm = lm
        self.live: list[_Live] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=lm.device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=lm.device)  # next position per row
        self.next_ids = torch.zeros((0, 1), dtype=torch.long, device=lm.device)  # token each row feeds next
        # transformers 5 names the cache argument ``cache``; remote-code models may still say past_key_values.
        params = inspect.signature(lm.base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        probe = DynamicCache(config=lm.model.config)
        if not all(_plain(layer) for layer in probe.layers):
            raise UnsupportedModelError(
                "continuous batching needs a model whose attention caches every position (this one has "
                "sliding-window or linear-attention layers): set scheduling: static (--scheduling static)"
            )
        self._hooks = contextlib.ExitStack()
        self._hook_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.live)

    # ------------------------------------------------------------------ the model

    def _forward(self, rows: Sequence[_Live], **inputs: Any) -> torch.Tensor:
        """Last-position logits (rows x vocab) of one forward pass; ``inputs`` go to the model."""
        lm = self.lm
        inputs[self.cache_arg] = inputs.pop("cache")
        model = lm.model
        if lm.is_peft:
            # PEFT's mixed-batch hooks (what adapter_names= does per call), kept in place while
            # the batch's rows stay the same: registering them walks every module of the model.
            names = [x.row.model for x in rows]
            if names != self._hook_names:
                self.release()
                self._hooks.enter_context(lm.model._enable_peft_forward_hooks(adapter_names=names))
                self._hook_names = names
            model = lm.model.get_base_model()
        with torch.inference_mode():
            out = model(use_cache=True, logits_to_keep=1, **inputs)
        return out.logits[:, -1, :]

    def release(self) -> None:
        """Take the adapter hooks off the model (before anything else uses or changes it)."""
        self._hooks.close()
        self._hook_names = None

    def _choose(self, rows: Sequence[_Live], logits: torch.Tensor) -> list[int]:
        """One token per row: the argmax, or the row's chooser when it has one."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, x in enumerate(rows):
            if x.chooser is not None:
                tokens[i] = x.chooser.choose(logits[i : i + 1])
        return tokens

    # ------------------------------------------------------------------ join

    def prefill(self, rows: Sequence[Row]) -> None:
        """Run the prompts of ``rows``, choose their first tokens and add them to the batch.

        Raises when the forward pass fails; the batch is then unchanged (the caller retries the
        rows one by one to find the one that fails)."""
        lm = self.lm
        new = [_Live(r, lm.tokenizer, lm.eos_ids) for r in rows]
        batch = lm.tokenizer.pad(
            {"input_ids": [r.prompt_ids for r in rows]}, padding_side="left", return_tensors="pt"
        ).to(lm.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # generate()'s positions for left padding: count real tokens, padding at 0 (masked anyway).
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=lm.model.config)
        logits = self._forward(new, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        tokens = self._choose(new, logits)
        keep = self._advance(new, tokens)
        if not keep:
            return
        index = torch.tensor(keep, device=lm.device)
        if len(keep) < len(new):
            _select(cache, index)
            mask, positions = mask[index], positions[index]
        self._join(
            [new[i] for i in keep],
            cache,
            mask,
            positions[:, -1:] + 1,
            torch.tensor([[tokens[i]] for i in keep], device=lm.device),
        )

    def _join(
        self,
        new: list[_Live],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        next_ids: torch.Tensor,
    ) -> None:
        if self.cache is None or not self.live:
            self.live, self.cache, self.mask, self.positions, self.next_ids = (
                new,
                cache,
                mask,
                positions,
                next_ids,
            )
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.live = self.live + new

    # ------------------------------------------------------------------ step

    def step(self) -> None:
        """Generate one token for every row; rows that end are answered and leave the batch."""
        if not self.live:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
        logits = self._forward(
            self.live,
            input_ids=self.next_ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
        )
        tokens = self._choose(self.live, logits)
        self.positions = self.positions + 1
        self.next_ids = torch.tensor([[t] for t in tokens], device=self.mask.device)
        keep = self._advance(self.live, tokens)
        if len(keep) < len(self.live):
            self.keep(keep)

    def _advance(self, rows: Sequence[_Live], tokens: list[int]) -> list[int]:
        """Hand each row its token, deliver its text; the indices of the rows still running."""
        keep = []
        for i, (x, token) in enumerate(zip(rows, tokens, strict=True)):
            x.text.add(token)
            x.text.deliver()
            if not x.text.finished:
                keep.append(i)
        return keep

    # ------------------------------------------------------------------ leave

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (in this order); the others leave without a word."""
        if not indices:
            self.live, self.cache = [], None
            self.mask = self.mask[:0, :0]
            self.positions, self.next_ids = self.positions[:0], self.next_ids[:0]
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.live = [self.live[i] for i in indices]
        self.mask, self.positions, self.next_ids = (
            self.mask[index],
            self.positions[index],
            self.next_ids[index],
        )
        assert self.cache is not None
        _select(self.cache, index)
        # Columns that are padding in every remaining row: drop them (the longest row left sets the width).
        used = self.mask.any(dim=0)
        first = int(used.to(torch.int8).argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def drop(self, predicate: Any) -> list[Row]:
        """Take the rows for which ``predicate(row)`` holds out of the batch; returns them."""
        gone = [x.row for x in self.live if predicate(x.row)]
        if gone:
            self.keep([i for i, x in enumerate(self.live) if not predicate(x.row)])
        return gone


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad dimension 2 of a cache tensor (batch, heads, seq, dim), or 1 of a mask, with zeros."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _select(cache: DynamicCache, index: torch.Tensor) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
