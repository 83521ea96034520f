"""Readers: JSON arrays, JSON Lines, CSV and Parquet, each record with its line number."""

from __future__ import annotations

import importlib.util
import json

import pytest

from kubetune_trainer.data import DataError, DataOptions, DataSource, prepare_datasets
from kubetune_trainer.data.readers import file_sha256, read_records
from kubetune_trainer.tiny_model import build_tokenizer


def test_json_array_records_know_their_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b\nc"}, {"text": "d"}], indent=2))
    records = read_records(path)
    assert [r.data["text"] for r in records] == ["a", "b\nc", "d"]
    assert [r.line for r in records] == [2, 5, 8]


def test_jsonl_skips_blank_lines_and_bom(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\n')
    records = read_records(path)
    assert [(r.line, r.data["text"]) for r in records] == [(1, "a"), (3, "b")]


def test_json_extension_with_json_lines_content(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r.line for r in read_records(path)] == [1, 2]


def test_csv_rows_with_quoted_newlines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\n"Say ""hi""",,hi\n"multi\nline",x,y\nlast,,z\n')
    records = read_records(path)
    assert records[0].data == {"instruction": 'Say "hi"', "input": "", "output": "hi"}
    assert [r.line for r in records] == [2, 4, 5]  # the line each row ends on


def test_csv_row_with_too_many_cells(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text\nok\na,b\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3: the row has more cells"):
        read_records(path)


def test_csv_end_to_end_and_fingerprint(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\nTwo plus two is, four\nThree plus one is, four\n")
    data = prepare_datasets(build_tokenizer(), [DataSource(str(path))], DataOptions())
    assert len(data.train) == 2 and data.stats.source(str(path)).format == "completion"
    assert data.fingerprints == {str(path): file_sha256(path)}
    assert len(data.fingerprints[str(path)]) == 64


def test_chat_in_csv_is_explained(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\n')
    with pytest.raises(DataError) as err:
        prepare_datasets(build_tokenizer(), [DataSource(str(path))], DataOptions())
    assert "chat.csv, line 2, field 'messages': expected an array, got a string" in str(err.value)
    assert "JSON Lines" in err.value.fix


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "train.parquet" in str(err.value) and "pip install pyarrow" in err.value.fix


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    records = read_records(path)
    assert [(r.line, r.unit, r.data) for r in records] == [
        (1, "row", {"text": "a"}),
        (2, "row", {"text": "b"}),
    ]
