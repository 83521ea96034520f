"""Readers: JSON arrays, JSON Lines, CSV and Parquet, each record with its line number."""

from __future__ import annotations

import json
import sys

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


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    # pyarrow is in the train extra; an install without it must still fail with a fix, not a traceback.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "train.parquet" in str(err.value) and "pip install pyarrow" in err.value.fix


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "broken.parquet" in str(err.value) and "cannot read Parquet" in str(err.value)


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    records = read_records(path)
    assert [(r.line, r.unit, r.data) for r in records] == [
        (1, "row", {"text": "a"}),
        (2, "row", {"text": "b"}),
    ]


def test_parquet_instruction_data_goes_through_the_pipeline(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    rows = {"instruction": ["add 2 and 3", "add 4 and 4"], "output": ["5", "8"]}
    pq.write_table(pa.table(rows), path)
    data = prepare_datasets(build_tokenizer(), [DataSource(str(path))], DataOptions())
    assert data.stats.source(str(path), "train").format == "instruction"
    assert len(data.train) == 2
    for example in data.train.examples:  # loss on the response only
        assert example.labels[0] == -100 and any(label != -100 for label in example.labels)


def test_parquet_bad_field_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", None]}), path)
    with pytest.raises(DataError) as err:
        prepare_datasets(build_tokenizer(), [DataSource(str(path))], DataOptions())
    assert "bad.parquet, row 2, field 'output'" in str(err.value)
