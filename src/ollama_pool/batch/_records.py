"""Lazy reading and validation of the input JSONL file."""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_pool.batch._errors import InvalidRecordError

RecordId = str | int

# Counting lines reads the whole file once; past this size the progress bar
# shows no total rather than delay the start.
MAX_COUNTED_BYTES = 1 << 30
_COUNT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class InputRecord:
    """A valid input record and the line it came from (1-based)."""

    line_number: int
    id: RecordId
    data: dict[str, Any]


@dataclass(frozen=True)
class InvalidLine:
    """An input line that cannot be run, with the id its error line gets."""

    line_number: int
    id: RecordId
    error: InvalidRecordError


def record_key(record_id: RecordId) -> str:
    """Return the key that identifies `record_id` in sets and dicts.

    JSON-encoding keeps the id `1` and the id `"1"` apart.
    """
    return json.dumps(record_id, ensure_ascii=False)


def line_id(line_number: int) -> str:
    """Return the id given to an input line that has no usable id of its own.

    NOTE: a valid record whose own id is literally "line:N" collides with the
    id given to an invalid input line N, and is then reported as a duplicate.
    """
    return f"line:{line_number}"


def iter_input(
    path: Path, *, id_field: str = "id", question_field: str = "question"
) -> Generator[InputRecord | InvalidLine, None, None]:
    """Yield each non-blank line of `path` as a record or an invalid line.

    The file is read one line at a time, so its size is not limited by memory.
    Blank lines are not records and are skipped.
    """
    with path.open("rb") as file:
        for line_number, raw in enumerate(file, start=1):
            if raw.strip():
                yield parse_line(raw, line_number, id_field, question_field)


def parse_line(
    raw: bytes, line_number: int, id_field: str, question_field: str
) -> InputRecord | InvalidLine:
    """Parse and validate one input line."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return _invalid(line_number, None, f"not valid JSON ({exc})")
    if not isinstance(data, dict):
        return _invalid(
            line_number, None, f"expected a JSON object, got {type(data).__name__}"
        )

    record_id = data.get(id_field)
    if record_id is None:
        return _invalid(line_number, None, f"missing the id field {id_field!r}")
    if not _is_valid_id(record_id):
        return _invalid(
            line_number,
            None,
            f"invalid id {record_id!r}: expected a non-empty string or an integer",
        )

    question = data.get(question_field)
    if not isinstance(question, str) or not question.strip():
        problem = "missing" if question is None else "empty or not a string"
        return _invalid(
            line_number, record_id, f"question field {question_field!r} is {problem}"
        )
    return InputRecord(line_number=line_number, id=record_id, data=data)


def _is_valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and bool(value.strip())


def _invalid(line_number: int, record_id: RecordId | None, problem: str) -> InvalidLine:
    error = InvalidRecordError(f"input line {line_number}: {problem}")
    if record_id is None:
        record_id = line_id(line_number)
    return InvalidLine(line_number=line_number, id=record_id, error=error)


def count_lines(path: Path, max_bytes: int = MAX_COUNTED_BYTES) -> int | None:
    """Return the number of lines in `path`, or None when it is over `max_bytes`.

    Blank lines count too, so the number can be above the number of records.
    """
    if path.stat().st_size > max_bytes:
        return None
    count = 0
    last_byte = b"\n"
    with path.open("rb") as file:
        while chunk := file.read(_COUNT_CHUNK_BYTES):
            count += chunk.count(b"\n")
            last_byte = chunk[-1:]
    # A last line without a newline is a line too.
    return count + (last_byte != b"\n")
