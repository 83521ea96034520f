"""Deterministic train/validation split.

Each example gets a score from a hash of the seed and its content; the ``round(n * fraction)``
lowest scores go to validation. The assignment depends only on the seed and the example itself,
not on file order or on what else is in the file, so re-running (or appending data) keeps
existing examples on the side they were on, apart from the few near the cut-off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_score(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


def validation_count(n: int, fraction: float) -> int:
    """At least one validation example and at least one training example when n >= 2."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def split_by_hash(
    items: Sequence[T], keys: Sequence[str], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """(train, validation), both in the items' original order."""
    k = validation_count(len(items), fraction)
    ranked = sorted(range(len(items)), key=lambda i: (split_score(seed, keys[i]), i))
    chosen = set(ranked[:k])
    train = [item for i, item in enumerate(items) if i not in chosen]
    validation = [item for i, item in enumerate(items) if i in chosen]
    return train, validation
