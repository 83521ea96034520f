"""Filters: empty and over-long examples, exact and normalised dedupe, with counts reported."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.data import DataError, DataOptions, DataSource, prepare_datasets
from kubetune_trainer.data.filters import normalize_text
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!!\n\tHow's it — going?  ") == "hello world hows it going"
    # NFKC: full-width letters and the ideographic space become plain ones.
    assert normalize_text("\uff26\uff35\uff2c\uff2c\u3000width") == "full width"
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower


DUPES = [
    {"instruction": "Capital of France?", "output": "Paris"},
    {"instruction": "Capital of France?", "output": "Paris"},  # exact duplicate
    {"instruction": "capital  of FRANCE", "output": "Paris."},  # duplicate once normalised
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},  # empty input == no input
    {"instruction": "Capital of Spain?", "output": "Madrid"},
    {"instruction": "Capital of Spain?", "input": "Europe", "output": "Madrid"},  # differs by input
]


@pytest.mark.parametrize("mode,kept,removed", [("none", 6, 0), ("exact", 4, 2), ("normalized", 3, 3)])
def test_dedupe_counts(tokenizer, tmp_path, mode, kept, removed):
    path = write_jsonl(tmp_path / "d.jsonl", DUPES)
    data = prepare_datasets(tokenizer, [DataSource(path)], DataOptions(dedupe=mode))
    stats = data.stats.source(path)
    assert (stats.read, stats.kept, stats.duplicates_removed) == (6, kept, removed)
    assert len(data.train) == kept
    assert f"  {removed}  " in data.stats.summary()


def test_dedupe_spans_all_training_files_first_occurrence_wins(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "two"}, {"text": "three"}])
    data = prepare_datasets(tokenizer, [DataSource(a), DataSource(b)], DataOptions())
    assert data.stats.source(a).duplicates_removed == 0
    assert data.stats.source(b).duplicates_removed == 1


def test_empty_examples_are_dropped_and_counted(tokenizer, tmp_path):
    rows = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Say hi twice", "output": "   "},  # blank response
        {"instruction": "", "output": "orphan answer"},  # blank instruction
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Anyone?"}]},  # no assistant turn: nothing to learn
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        ],
    )
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "kept"}, {"text": ""}, {"text": " \n\t"}])
    completion = write_jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": "only a prompt", "completion": ""}, {"prompt": "", "completion": "x"}],
    )
    data = prepare_datasets(
        tokenizer,
        [DataSource(path), DataSource(chat), DataSource(text), DataSource(completion)],
        DataOptions(),
    )
    assert [
        (data.stats.source(p).empty_dropped, data.stats.source(p).kept)
        for p in (path, chat, text, completion)
    ] == [
        (2, 1),
        (2, 1),
        (2, 1),
        (1, 1),
    ]


def test_too_long_examples_dropped_or_truncated(tokenizer, tmp_path):
    rows = [
        {"prompt": "short", "completion": " answer"},
        {"prompt": "a long prompt " * 20, "completion": " answer"},  # the prompt alone is over the limit
        {"prompt": "short", "completion": " a long answer" * 20},  # truncation keeps part of the answer
    ]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    dropped = prepare_datasets(tokenizer, [DataSource(path)], DataOptions(max_seq_length=32))
    stats = dropped.stats.source(path)
    assert (stats.kept, stats.too_long_dropped, stats.truncated) == (1, 2, 0)

    truncated = prepare_datasets(
        tokenizer, [DataSource(path)], DataOptions(max_seq_length=32, drop_too_long=False)
    )
    stats = truncated.stats.source(path)
    assert (stats.kept, stats.too_long_dropped, stats.truncated) == (2, 1, 1)
    assert max(len(item["input_ids"]) for item in truncated.train) == 32
    assert all(len(item["input_ids"]) == len(item["labels"]) for item in truncated.train)


def test_a_file_with_nothing_left_fails_with_the_counts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 100}, {"text": ""}])
    with pytest.raises(DataError) as err:
        prepare_datasets(tokenizer, [DataSource(path)], DataOptions(max_seq_length=16))
    assert "long.jsonl" in str(err.value)
    assert "2 read, 1 empty, 0 duplicates, 1 longer than max_seq_length" in str(err.value)
    assert "max_seq_length" in err.value.fix


def test_summary_reports_every_count(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl", [{"text": "a b c"}, {"text": "a b c"}, {"text": ""}, {"text": "x " * 80}]
    )
    data = prepare_datasets(tokenizer, [DataSource(path)], DataOptions(max_seq_length=40))
    summary = data.stats.summary()
    header, row = summary.splitlines()[1:3]
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert cells == {
        "split": "train", "format": "text", "read": "4", "empty": "1", "dupes": "1", "too_long": "1",
        "truncated": "0", "kept": "1", "to_val": "0", "used": "1", "file": path,
    }  # fmt: skip
    assert data.stats.as_dict()["train_examples"] == 1
