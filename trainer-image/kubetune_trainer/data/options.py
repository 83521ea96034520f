"""What to read (DataSource) and how to prepare it (DataOptions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune_trainer.config import AugmentationSettings
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.filters import DEDUPE_MODES, Dedupe
from kubetune_trainer.data.formats import FORMATS

SourceFormat = Literal["auto", "text", "instruction", "chat", "completion"]


@dataclass(frozen=True)
class DataSource:
    """A data file. ``weight`` is its share of the training set when several train sources are mixed.

    ``origin`` is where a downloaded file came from (an s3:// URI): errors, statistics and the
    provenance name it rather than the local copy the user never saw.
    """

    path: str
    format: SourceFormat = "auto"
    weight: float = 1.0
    origin: str | None = None

    @property
    def name(self) -> str:
        return self.origin or self.path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(Path(self.path)) if isinstance(self.path, Path) else self.path)
        if self.format != "auto" and self.format not in FORMATS:
            raise DataError(
                self.name,
                f"unknown format '{self.format}'",
                f"set format to 'auto' or one of {', '.join(repr(f) for f in FORMATS)}",
                field="format",
            )
        if not isinstance(self.weight, int | float) or not math.isfinite(self.weight) or self.weight <= 0:
            raise DataError(
                self.name,
                f"weight must be a positive number, got {self.weight!r}",
                "set weight > 0",
                field="weight",
            )


@dataclass(frozen=True)
class DataOptions:
    """How examples are filtered, split and mixed (batching is the collator's: data/collate.py).
    Invalid values raise ValueError."""

    max_seq_length: int = 1024
    dedupe: Dedupe = "exact"
    validation_split: float | None = None
    seed: int = 42
    replay_fraction: float = 0.0
    drop_too_long: bool = (
        True  # False: truncate from the right instead (examples left with no response are dropped)
    )
    augmentation: AugmentationSettings | None = None  # of the training split only (data/augment.py)

    def __post_init__(self) -> None:
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be an integer >= 2, got {self.max_seq_length!r}")
        if self.dedupe not in DEDUPE_MODES:
            raise ValueError(f"dedupe must be one of {', '.join(DEDUPE_MODES)}, got {self.dedupe!r}")
        if self.validation_split is not None and not 0 < self.validation_split < 1:
            raise ValueError(
                f"validation_split must be between 0 and 1 (exclusive), got {self.validation_split!r}; "
                "use None for no split"
            )
        if not math.isfinite(self.replay_fraction) or not 0 <= self.replay_fraction < 1:
            raise ValueError(
                f"replay_fraction must be >= 0 and < 1 (the share of the training set that is replay), "
                f"got {self.replay_fraction!r}"
            )
