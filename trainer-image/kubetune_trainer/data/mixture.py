"""Multi-task mixtures: several training sources combined by weight.

A weight is the share of the training set drawn from that source: weights are normalised to sum to
1, and the mixed set has as many examples as all sources together (so an epoch is as long as plain
concatenation would make it). A source whose share exceeds its size is repeated (upsampled); one
whose share is smaller is subsampled. Everything is drawn from seeded generators: the same inputs
and seed give the same training set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Examples to take from each source: sum(sizes) split by weight, rounded by largest remainder."""
    total = sum(sizes)
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items: whole copies of ``items`` first, then a random subset without repeats."""
    if count <= 0 or not items:
        return []
    copies, rest = divmod(count, len(items))
    return list(items) * copies + rng.sample(list(items), rest)


def mix(groups: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> tuple[list[T], list[int]]:
    """(the shuffled mixture, how many examples each group contributed)."""
    counts = mixture_counts([len(g) for g in groups], weights)
    mixed: list[T] = []
    for i, (group, count) in enumerate(zip(groups, counts, strict=True)):
        mixed += sample(group, count, random.Random(f"{seed}:mixture:{i}"))
    random.Random(f"{seed}:shuffle").shuffle(mixed)
    return mixed, counts
