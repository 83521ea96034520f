"""Turning rendered examples into input_ids and labels, with prompt tokens masked (-100).

Each segment is tokenised on its own (add_special_tokens=False) and the ids are concatenated. That is
how the tokens look at inference time too: the prompt is encoded, then the model produces the
response tokens one by one; tokenising prompt+response as one string could merge tokens across the
boundary and train the model on token sequences it never sees when generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubetune_trainer.data.formats import Rendered, detect_format, format_prompt
from kubetune_trainer.data.readers import Record

IGNORE_INDEX = -100  # the label value transformers' loss ignores
_BATCH = 2048  # segments per tokenizer call: the fast tokenizer parallelises within a batch


class SegmentEncoder:
    """Encodes Rendered examples for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        self.prefix = leading_special_ids(tokenizer)

    def encode(self, rendered: Sequence[Rendered]) -> list[tuple[list[int], list[int]]]:
        texts = [seg for r in rendered for seg, _ in r.segments]
        ids: list[list[int]] = []
        for start in range(0, len(texts), _BATCH):
            chunk = texts[start : start + _BATCH]
            ids.extend(self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        out = []
        pos = 0
        for r in rendered:
            input_ids: list[int] = []
            labels: list[int] = []
            if not r.chat:  # chat templates write their own BOS
                input_ids += self.prefix
                labels += [IGNORE_INDEX] * len(self.prefix)
            for _, trainable in r.segments:
                seg = ids[pos]
                pos += 1
                input_ids += seg
                labels += seg if trainable else [IGNORE_INDEX] * len(seg)
            if not r.chat and self.eos_id is not None:  # so the model learns where a response ends
                input_ids.append(self.eos_id)
                labels.append(self.eos_id)
            out.append((input_ids, labels))
        return out

    def encode_prompt(self, rendered: Rendered) -> list[int]:
        """The ids the model sees before its (last) response, exactly as training encoded them."""
        ids = [] if rendered.chat else list(self.prefix)
        last = max(i for i, (_, trainable) in enumerate(rendered.segments) if trainable)
        context = [seg for seg, _ in rendered.segments[:last]]  # everything before the last response
        for seg in self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []:
            ids += seg
        return ids


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (usually [BOS], or nothing)."""
    probe = "hello"
    with_specials = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_specials) - len(bare) + 1):
        if with_specials[i : i + len(bare)] == bare:
            return with_specials[:i]
    return []


def encode_prompt(tokenizer: Any, example: dict[str, Any], format: str = "auto") -> list[int]:
    """Token ids of the prompt for generation, encoded the way training encoded prompts.

    format_prompt gives the text; this adds the tokenizer's leading special tokens for the plain
    formats and none for chat (whose template writes them as text).
    """
    text = format_prompt(tokenizer, example, format)
    fmt = detect_format(Record("<example>", 1, example)) if format == "auto" else format
    prefix = [] if fmt == "chat" else leading_special_ids(tokenizer)
    return prefix + (list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else [])
