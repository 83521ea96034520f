"""The one exception bad data raises: it says where (file, line, field), what and how to fix it."""

from __future__ import annotations

from typing import Any


class DataError(Exception):
    """A problem with an input data file, raised before any tokenisation or training starts.

    The message always names the file and, where they apply, the line (1-based; the record's row for
    CSV/Parquet) and the field, and ends with a "Fix:" sentence.
    """

    def __init__(
        self,
        file: str,
        problem: str,
        fix: str,
        *,
        line: int | None = None,
        field: str | None = None,
        column: int | None = None,
        unit: str = "line",
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.column = column
        self.problem = problem
        self.fix = fix
        where = [file]
        if line is not None:
            where.append(f"{unit} {line}")
        if column is not None:
            where.append(f"column {column}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}. Fix: {fix}")


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, as a user who wrote the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
