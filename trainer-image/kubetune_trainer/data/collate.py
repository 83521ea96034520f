"""Batching: padding-free packing, or padding to the longest example of the batch.

Packing uses transformers' DataCollatorWithFlattening: the batch's examples are concatenated into
one row with ``position_ids`` restarting at 0 for each example and the first label of each example
set to -100. From those position_ids transformers (masking_utils.find_packed_sequence_indices)
builds a block-diagonal causal mask for sdpa/eager attention, and flash-attention reads the same
boundaries, so no token attends to, or is trained to predict, a token of another example.

That holds when the forward pass has no KV cache and no attention_mask, which is how Trainer
trains (TrainingArguments.use_cache defaults to False). It does not hold for PEFT prefix tuning
(which feeds a cache) or prompt tuning / P-tuning (PEFT drops position_ids): use packing with LoRA,
QLoRA or full fine-tuning only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from kubetune_trainer.data.tokenize import IGNORE_INDEX


class PadToLongestCollator:
    """Right-pads input_ids (pad token), labels (-100) and builds the attention mask.

    Written out rather than using DataCollatorForSeq2Seq because that follows
    tokenizer.padding_side, which is often "left" (set for generation); training needs right
    padding so that positions computed from 0 line up with the real tokens.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(
    tokenizer: Any, packing: bool, pad_to_multiple_of: int | None = None
) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
    """The data collator for Trainer: padding-free packing, or right-padding to the batch's longest."""
    if packing:
        # The example boundaries go along (cu_seq_lens_*): flash-attention and packed_sdpa
        # (packed_attention.py) attend within each example from them.
        return DataCollatorWithFlattening(
            return_position_ids=True, return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id  # pad positions are masked out of attention and loss anyway
    if pad_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token to pad batches with; "
            "set tokenizer.pad_token (or use packing, which needs no padding)"
        )
    return PadToLongestCollator(pad_id, pad_to_multiple_of)
