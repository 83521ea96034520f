"""Counts of what happened to the data, per source, for logs and the provenance file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceStats:
    file: str
    split: str  # train | validation | test | replay
    format: str = ""
    weight: float | None = None  # mixture weight (train sources only)
    read: int = 0
    empty_dropped: int = 0
    duplicates_removed: int = 0
    too_long_dropped: int = 0
    truncated: int = 0  # over-long examples cut to max_seq_length (drop_too_long=False)
    kept: int = 0  # after the filters above
    to_validation: int = 0  # kept examples moved to the validation split (validation_split)
    augmented: int = 0  # variants added by data augmentation (train sources only)
    used: int = 0  # examples in the final split; more than kept when a mixture upsamples the source
    tokens: int = 0  # tokens in the kept examples

    def dropped_summary(self) -> str:
        return (
            f"{self.read} read, {self.empty_dropped} empty, {self.duplicates_removed} duplicates, "
            f"{self.too_long_dropped} longer than max_seq_length"
        )


@dataclass
class DataStats:
    sources: list[SourceStats] = field(default_factory=list)
    train_examples: int = 0
    train_tokens: int = 0
    validation_examples: int = 0
    test_examples: int = 0
    replay_examples: int = 0
    # Data augmentation: {method: {generated, kept, dropped}} (data/augment.py METHODS)
    augmentation: dict[str, dict[str, int]] = field(default_factory=dict)

    def source(self, file: str, split: str = "train") -> SourceStats:
        for s in self.sources:
            if s.file == file and s.split == split:
                return s
        raise KeyError(f"no {split} source {file!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = (
            f"data: train {self.train_examples} examples ({self.train_tokens} tokens), "
            f"validation {self.validation_examples}, test {self.test_examples}, replay {self.replay_examples}"
        )
        cols = (
            "split",
            "format",
            "read",
            "empty",
            "dupes",
            "too_long",
            "truncated",
            "kept",
            "to_val",
            "augmented",  # shown only when augmentation is on
            "used",
            "file",
        )
        rows = [
            (s.split, s.format, s.read, s.empty_dropped, s.duplicates_removed, s.too_long_dropped, s.truncated,
             s.kept, s.to_validation, s.augmented, s.used, s.file)
            for s in self.sources
        ]  # fmt: skip
        if not self.augmentation:
            drop = cols.index("augmented")
            cols = cols[:drop] + cols[drop + 1 :]
            rows = [r[:drop] + r[drop + 1 :] for r in rows]
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
        lines = [head, "  " + "  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
        lines += [
            "  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines += [
            f"  augmentation {method}: {c['generated']} generated, {c['kept']} kept, {c['dropped']} dropped"
            for method, c in self.augmentation.items()
        ]
        return "\n".join(lines)
