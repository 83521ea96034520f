"""Generation-based metrics for a model in memory (used at periodic evaluation and by test()).

Prompts are the exact token ids training put before each response
(``PreparedData.eval_examples()['prompt_ids']``), generated greedily in left-padded batches,
so a metric measures what the model learned rather than a template mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kubetune_trainer.evaluation.metrics import compute_text_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_from_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Generate a continuation for each prompt (token ids); returns the decoded new text."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [list(p) for p in prompts[start : start + batch_size]]
            longest = max(len(p) for p in batch)
            # Left padding: every prompt ends at the same position, where generation starts.
            input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, ids in enumerate(batch):
                if ids:
                    input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention[row, longest - len(ids) :] = 1
            kwargs: dict[str, Any] = {
                "input_ids": input_ids.to(device),
                "attention_mask": attention.to(device),
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "pad_token_id": pad_id,
                "eos_token_id": tokenizer.eos_token_id,
                "use_cache": True,
            }
            if do_sample:
                kwargs["temperature"] = temperature
            if synced_gpus:
                kwargs["synced_gpus"] = True  # ZeRO-3: every rank must take part in each forward
            out = model.generate(**kwargs)
            new_tokens = out[:, longest:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def generation_metrics(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    semantic_model: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Generate for each example with a prompt and score against its reference.

    Returns (metrics, predictions). Examples without a prompt (text format) are skipped.
    """
    usable = [ex for ex in examples if ex.get("prompt_ids") and ex.get("reference") is not None]
    if not usable:
        raise ValueError(
            "generation metrics need prompt/response data (instruction, chat or completion format); "
            "this evaluation data is plain text: use perplexity only"
        )
    predictions = generate_from_ids(
        model, tokenizer, [ex["prompt_ids"] for ex in usable], max_new_tokens, batch_size, synced_gpus
    )
    references = [ex["reference"] for ex in usable]
    return compute_text_metrics(metrics, predictions, references, semantic_model), predictions
