"""Replay for continual learning: examples of earlier tasks mixed into the new training set.

``replay_fraction`` is relative to the new training set: with 1,000 new examples and a fraction of
0.2, 200 replay examples are added (1,200 in all; replay is then 1/6 of the mixture). The replay
examples are a seeded sample of the replay source, repeated if the source is smaller than needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from kubetune_trainer.data.mixture import sample

T = TypeVar("T")


def replay_count(train_size: int, fraction: float) -> int:
    return round(train_size * fraction)


def add_replay(train: Sequence[T], replay: Sequence[T], fraction: float, seed: int) -> tuple[list[T], int]:
    """(train with the replay sample shuffled in, the number of replay examples added)."""
    chosen = sample(replay, replay_count(len(train), fraction), random.Random(f"{seed}:replay"))
    mixed = list(train) + chosen
    random.Random(f"{seed}:replay-shuffle").shuffle(mixed)
    return mixed, len(chosen)
