"""Filters: empty examples, over-long examples and duplicates (exact or normalised)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Literal

Dedupe = Literal["none", "exact", "normalized"]
DEDUPE_MODES: tuple[str, ...] = ("none", "exact", "normalized")

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Casefolded, punctuation-stripped, whitespace-collapsed text.

    NFKC first, so that full-width letters and ligatures compare equal to their plain forms; every
    Unicode punctuation character (category P*) is removed, not just ASCII ones.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def dedupe_key(parts: list[str], mode: Dedupe, fmt: str) -> str:
    """A digest identifying an example under the dedupe mode (the format is part of the identity)."""
    if mode == "normalized":
        parts = [normalize_text(p) for p in parts]
    payload = json.dumps([fmt, *parts], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class Deduper:
    """Remembers the keys it has seen; ``seen_before`` is True for every repeat after the first."""

    def __init__(self, mode: Dedupe) -> None:
        self.mode = mode
        self._seen: set[str] = set()

    def seen_before(self, parts: list[str], fmt: str) -> bool:
        if self.mode == "none":
            return False
        key = dedupe_key(parts, self.mode, fmt)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def fit_length(
    input_ids: list[int], labels: list[int], max_len: int, drop: bool
) -> tuple[list[int], list[int]] | None:
    """The example within max_len tokens, or None when it must be dropped.

    drop=True drops every over-long example; drop=False truncates from the right and still drops the
    example when truncation leaves no token to learn from (a prompt longer than max_len).
    """
    if len(input_ids) <= max_len:
        return input_ids, labels
    if drop:
        return None
    labels = labels[:max_len]
    if all(label == -100 for label in labels[1:]):  # the first label is never predicted (shifted loss)
        return None
    return input_ids[:max_len], labels
