"""prepare_datasets: files -> validated, filtered, tokenised, split, mixed datasets.

Order of work for each source: read -> validate every record (fail fast, before any tokenisation)
-> drop empty -> drop duplicates -> render + tokenise -> drop (or truncate) over-long. Then the
train sources are split (validation_split), augmented (augmentation: the training side only, see
augment.py), mixed by weight, and replay examples are added.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.utils.data import Dataset

from kubetune_trainer.data.augment import Item, augment
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.filters import Dedupe, Deduper, dedupe_key, fit_length
from kubetune_trainer.data.formats import (
    Format,
    Rendered,
    dedupe_texts,
    detect_format,
    is_empty,
    render,
    validate,
)
from kubetune_trainer.data.mixture import mix
from kubetune_trainer.data.options import DataOptions, DataSource
from kubetune_trainer.data.readers import Record, file_sha256, read_records
from kubetune_trainer.data.replay import add_replay
from kubetune_trainer.data.split import split_by_hash
from kubetune_trainer.data.stats import DataStats, SourceStats
from kubetune_trainer.data.tokenize import SegmentEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    source: str  # the file it came from
    line: int
    format: Format
    key: str  # exact-content digest (split hashing)
    rendered: Rendered
    input_ids: list[int]
    labels: list[int]
    fields: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # for augmentation


class TokenizedDataset(Dataset):
    """Items are dict(input_ids=list[int], labels=list[int]); ``examples`` keeps where each came from."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return (self[i] for i in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return sum(len(ex.input_ids) for ex in self.examples)


@dataclass
class PreparedData:
    train: TokenizedDataset
    validation: TokenizedDataset | None
    test: TokenizedDataset | None
    stats: DataStats
    fingerprints: dict[str, str]  # file -> sha256, for the provenance file
    encoder: SegmentEncoder = field(repr=False)
    # Every kept replay example (not just the sample mixed into train): e.g. for EWC's Fisher estimate.
    replay: TokenizedDataset | None = None

    def eval_examples(self, split: str = "validation") -> list[dict[str, Any]]:
        """dict(prompt, reference, text, prompt_ids, format) per example, for generation metrics.

        ``prompt_ids`` are the exact ids training put before the response: generate from them. The
        ``prompt`` text of chat data holds the template's special tokens, so encode it with
        add_special_tokens=False if you encode it yourself. Text-format data has an empty prompt and
        the whole text as reference (use perplexity for it).
        """
        if split not in ("validation", "test", "train"):
            raise ValueError(f"split must be 'validation', 'test' or 'train', got {split!r}")
        dataset = {"validation": self.validation, "test": self.test, "train": self.train}[split]
        if dataset is None:
            hint = " or a validation_split" if split == "validation" else ""
            raise ValueError(f"there is no {split} data: give a {split} file{hint}")
        return [
            {
                "prompt": ex.rendered.prompt,
                "reference": ex.rendered.reference,
                "text": ex.rendered.text,
                "prompt_ids": self.encoder.encode_prompt(ex.rendered),
                "format": ex.format,
            }
            for ex in dataset.examples
        ]


def _load(
    tokenizer: Any,
    encoder: SegmentEncoder,
    source: DataSource,
    split: str,
    options: DataOptions,
    deduper: Deduper,
) -> tuple[list[Example], SourceStats]:
    stats = SourceStats(file=source.name, split=split, weight=source.weight if split == "train" else None)
    records = read_records(source.path, name=source.name)
    fmt: Format = detect_format(records[0]) if source.format == "auto" else source.format
    stats.format = fmt
    stats.read = len(records)

    # Validate everything before tokenising anything: bad data fails in seconds, not after an hour.
    keep: list[tuple[Record, dict[str, Any], list[str]]] = []
    validated = [(record, validate(record, fmt)) for record in records]
    for record, fields in validated:
        if is_empty(fields, fmt):
            stats.empty_dropped += 1
            continue
        parts = dedupe_texts(fields, fmt)
        if deduper.seen_before(parts, fmt):
            stats.duplicates_removed += 1
            continue
        keep.append((record, fields, parts))

    rendered = [render(tokenizer, fields, fmt, record) for record, fields, _ in keep]
    examples = []
    for (record, fields, parts), r, (input_ids, labels) in zip(
        keep, rendered, encoder.encode(rendered), strict=True
    ):
        fitted = fit_length(input_ids, labels, options.max_seq_length, options.drop_too_long)
        if fitted is None:
            stats.too_long_dropped += 1
            continue
        if len(fitted[0]) < len(input_ids):
            stats.truncated += 1
        examples.append(
            Example(source.name, record.line, fmt, dedupe_key(parts, "exact", fmt), r, *fitted, fields=fields)
        )
    stats.kept = len(examples)
    stats.tokens = sum(len(ex.input_ids) for ex in examples)
    if not examples:
        raise DataError(
            source.name,
            f"no examples left after filtering ({stats.dropped_summary()})",
            "check the file's content, raise max_seq_length, or set drop_too_long to false to truncate",
        )
    return examples, stats


def _augment(
    tokenizer: Any,
    encoder: SegmentEncoder,
    groups: list[list[Example]],
    originals: list[Example],
    options: DataOptions,
    stats: DataStats,
) -> list[list[Example]]:
    """The train groups with their augmented variants appended (each after its source's examples)."""
    assert options.augmentation is not None
    mode: Dedupe = "exact" if options.dedupe == "none" else options.dedupe
    seen = {dedupe_key(dedupe_texts(ex.fields or {}, ex.format), mode, ex.format) for ex in originals}
    owners = [(g, ex) for g, group in enumerate(groups) for ex in group]
    items = [Item(ex.key, ex.format, ex.fields or {}) for _, ex in owners]
    variants, counts = augment(
        items, options.augmentation, seed=options.seed, dedupe=options.dedupe, seen_keys=seen
    )
    rendered = []
    for v in variants:
        original = owners[v.index][1]
        record = Record(original.source, original.line, {})
        rendered.append(render(tokenizer, v.fields, original.format, record))
    out = [list(group) for group in groups]
    for v, r, (input_ids, labels) in zip(variants, rendered, encoder.encode(rendered), strict=True):
        g, original = owners[v.index]
        fitted = fit_length(input_ids, labels, options.max_seq_length, options.drop_too_long)
        if fitted is None:  # a rewrite can be longer than its original
            counts[v.method].kept -= 1
            counts[v.method].dropped += 1
            continue
        parts = dedupe_texts(v.fields, original.format)
        key = dedupe_key(parts, "exact", original.format)
        out[g].append(
            Example(original.source, original.line, original.format, key, r, *fitted, fields=v.fields)
        )
    stats.augmentation = {method: asdict(c) for method, c in counts.items()}
    return out


def prepare_datasets(
    tokenizer: Any,
    train: Sequence[DataSource],
    options: DataOptions,
    validation: DataSource | None = None,
    test: DataSource | None = None,
    replay: DataSource | None = None,
) -> PreparedData:
    """Read, check, filter, tokenise, split and mix the data. Bad data raises DataError."""
    if not train:
        raise ValueError("at least one training data source is needed")
    if validation is not None and options.validation_split is not None:
        raise ValueError("give either a validation file or validation_split, not both")
    if replay is not None and options.replay_fraction == 0:
        raise ValueError("a replay source is set but replay_fraction is 0: set replay_fraction > 0")
    if replay is None and options.replay_fraction > 0:
        raise ValueError("replay_fraction is set but there is no replay source")

    encoder = SegmentEncoder(tokenizer)
    stats = DataStats()
    fingerprints: dict[str, str] = {}
    train_deduper = Deduper(options.dedupe)  # shared: a duplicate across train files is still a duplicate

    def load(source: DataSource, split: str, deduper: Deduper) -> list[Example]:
        examples, source_stats = _load(tokenizer, encoder, source, split, options, deduper)
        stats.sources.append(source_stats)
        fingerprints[source.name] = file_sha256(source.path)
        return examples

    groups = [load(s, "train", train_deduper) for s in train]
    train_stats = list(stats.sources)
    train_originals = list(groups)  # before the split: a variant must not repeat a validation example

    validation_examples: list[Example] | None = None
    if validation is not None:
        validation_examples = load(validation, "validation", Deduper(options.dedupe))
    elif options.validation_split is not None:
        # Split each source on its own, so every task of a mixture is represented in validation.
        validation_examples = []
        for i, group in enumerate(groups):
            kept, held_out = split_by_hash(
                group, [ex.key for ex in group], options.validation_split, options.seed
            )
            groups[i] = kept
            validation_examples += held_out
            train_stats[i].to_validation = len(held_out)
        if not validation_examples:
            raise ValueError("validation_split needs at least 2 training examples per source")
    group_sizes = [len(g) for g in groups]

    if options.augmentation is not None:
        originals = [ex for group in train_originals for ex in group] + (validation_examples or [])
        groups = _augment(tokenizer, encoder, groups, originals, options, stats)
        for source_stats, group, before in zip(train_stats, groups, group_sizes, strict=True):
            source_stats.augmented = len(group) - before

    if len(groups) > 1:
        train_examples, counts = mix(groups, [s.weight for s in train], options.seed)
    else:
        train_examples, counts = groups[0], [len(groups[0])]
    for source_stats, count in zip(train_stats, counts, strict=True):
        source_stats.used = count

    replay_examples: list[Example] | None = None
    if replay is not None:
        replay_examples = load(replay, "replay", Deduper(options.dedupe))
        train_examples, added = add_replay(
            train_examples, replay_examples, options.replay_fraction, options.seed
        )
        stats.sources[-1].used = added
        stats.replay_examples = added

    test_examples = load(test, "test", Deduper(options.dedupe)) if test is not None else None

    train_ds = TokenizedDataset(train_examples)
    stats.train_examples = len(train_ds)
    stats.train_tokens = train_ds.num_tokens
    validation_ds = TokenizedDataset(validation_examples) if validation_examples is not None else None
    test_ds = TokenizedDataset(test_examples) if test_examples is not None else None
    stats.validation_examples = len(validation_ds) if validation_ds is not None else 0
    stats.test_examples = len(test_ds) if test_ds is not None else 0
    for split, ds in (("validation", validation_ds), ("test", test_ds)):
        for s in stats.sources:
            if s.split == split and ds is not None:
                s.used = len(ds)
    log.info("%s", stats.summary())
    replay_ds = TokenizedDataset(replay_examples) if replay_examples is not None else None
    return PreparedData(train_ds, validation_ds, test_ds, stats, fingerprints, encoder, replay_ds)
