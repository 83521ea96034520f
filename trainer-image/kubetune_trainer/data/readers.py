"""Reading data files into records that remember where they came from (file, line).

Supported: JSON arrays of objects, JSON Lines, CSV (header row) and Parquet (pyarrow, in the train
extra). JSON files are recognised by their content, not their extension: a ``.json`` file that
holds one object per line is read as JSON Lines, which is how many datasets are shipped.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.data.errors import DataError, json_type

JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One example as read: ``line`` is where it starts in the file (``unit`` says line or row)."""

    file: str
    line: int
    data: dict[str, Any]
    unit: str = "line"

    def error(self, field: str | None, problem: str, fix: str) -> DataError:
        return DataError(self.file, problem, fix, line=self.line, field=field, unit=self.unit)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_records(path: str | Path, name: str | None = None) -> list[Record]:
    """All records of a data file; raises DataError for anything unreadable or empty.

    ``name`` is what errors call the file (default: the path), e.g. the s3:// URI it came from.
    """
    name = name or str(path)
    p = Path(path)
    if not p.is_file():
        raise DataError(
            name, "file not found", "check the path (it is read from the trainer's working directory)"
        )
    suffix = p.suffix.lower()
    if suffix in JSON_SUFFIXES:
        records = _read_json(name, _decode(name, p.read_bytes()))
    elif suffix == ".csv":
        records = _read_csv(name, _decode(name, p.read_bytes()))
    elif suffix == ".parquet":
        records = _read_parquet(name, p)
    else:
        raise DataError(
            name,
            f"unsupported file type '{suffix or '(none)'}'",
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if not records:
        raise DataError(
            name, "the file holds no records", "add at least one example, or remove the file from the config"
        )
    return records


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            name, f"not valid UTF-8 (byte {exc.start})", "save the file as UTF-8", line=line
        ) from None


def _read_json(name: str, text: str) -> list[Record]:
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        return _read_json_array(name, text)
    if stripped[0] == "{":
        return _read_jsonl(name, text)
    first = len(text) - len(stripped)
    raise DataError(
        name,
        "expected a JSON array of objects or JSON Lines (one object per line)",
        'start the file with "[" (array) or write one {...} object per line',
        line=text.count("\n", 0, first) + 1,
    )


def _invalid_json(name: str, exc: json.JSONDecodeError, line: int | None = None) -> DataError:
    return DataError(
        name,
        f"invalid JSON: {exc.msg}",
        "correct the JSON syntax at that position (a missing comma, quote or bracket is the usual cause)",
        line=line if line is not None else exc.lineno,
        column=exc.colno,
    )


def _not_an_object(name: str, value: Any, line: int) -> DataError:
    return DataError(
        name,
        f"each record must be a JSON object, got {json_type(value)}",
        'write each example as an object such as {"text": "..."}',
        line=line,
    )


def _read_jsonl(name: str, text: str) -> list[Record]:
    records = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, for example) are not records
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _invalid_json(name, exc, line=lineno) from None
        if not isinstance(value, dict):
            raise _not_an_object(name, value, lineno)
        records.append(Record(name, lineno, value))
    return records


def _read_json_array(name: str, text: str) -> list[Record]:
    # Decode element by element so that each record knows the line it starts on.
    line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_right(line_starts, pos)

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    decoder = json.JSONDecoder()
    records: list[Record] = []
    pos = skip_ws(skip_ws(0) + 1)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _invalid_json(name, exc) from None
        if not isinstance(value, dict):
            raise _not_an_object(name, value, line_of(pos))
        records.append(Record(name, line_of(pos), value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                extra = json.JSONDecodeError("extra data after the closing ']'", text, skip_ws(pos + 1))
                raise _invalid_json(name, extra)
            return records
        missing = json.JSONDecodeError("expecting ',' or ']' after a record", text, min(pos, len(text)))
        raise _invalid_json(name, missing)


def _read_csv(name: str, text: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return []
    records = []
    for row in reader:
        if None in row:
            raise DataError(
                name,
                "the row has more cells than the header has columns",
                "quote cells that contain commas, or add the missing column names to the header",
                line=reader.line_num,
            )
        # Cells the row lacks come back as None: treat them as empty strings, like an empty cell.
        records.append(Record(name, reader.line_num, {k: ("" if v is None else v) for k, v in row.items()}))
    return records


def _read_parquet(name: str, path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            name,
            "reading Parquet needs the pyarrow package, which is not installed",
            "pip install pyarrow (or convert the file to JSON Lines)",
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(
            name, f"cannot read Parquet: {exc}", "check that the file is a complete Parquet file"
        ) from None
    return [Record(name, i, row, unit="row") for i, row in enumerate(rows, start=1)]
