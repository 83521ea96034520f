"""Replay for continual learning: examples of earlier tasks mixed into the new training set.

``replay_fraction`` is the share of the mixed training set (so of every epoch) that is replay, the
way mixture weights are shares: with 1,000 new examples and a fraction of 0.2, 250 replay examples
are added (1,250 in all, of which 20% replay). The replay examples are a seeded sample of the replay
source, repeated if the source is smaller than needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from kubetune_trainer.data.mixture import sample

T = TypeVar("T")


def replay_count(train_size: int, fraction: float) -> int:
    """Replay examples to add so they make up ``fraction`` (0 <= fraction < 1) of the result."""
    if not 0 <= fraction < 1:
        raise ValueError(f"replay_fraction must be in [0, 1), got {fraction}")
    return round(train_size * fraction / (1 - fraction))


def add_replay(train: Sequence[T], replay: Sequence[T], fraction: float, seed: int) -> tuple[list[T], int]:
    """(train with the replay sample shuffled in, the number of replay examples added)."""
    chosen = sample(replay, replay_count(len(train), fraction), random.Random(f"{seed}:replay"))
    mixed = list(train) + chosen
    random.Random(f"{seed}:replay-shuffle").shuffle(mixed)
    return mixed, len(chosen)
