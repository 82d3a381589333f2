"""The output JSONL file: crash-safe appends, repair and compaction on start.

Invariant: after `prepare_output` the file contains only whole lines, and each
record id has at most one line. Each line is written with one `os.write` on an
`O_APPEND` descriptor. A process killed in the middle of that write can leave a
torn last line, and the next run truncates it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_pool.batch._errors import OutputLockedError
from ollama_pool.batch._records import record_key

logger = logging.getLogger(__name__)

_TAIL_CHUNK_BYTES = 1 << 16


@dataclass
class OutputState:
    """Contents of the output file after `prepare_output`."""

    # Keys (see `record_key`) of the ids that already have a line.
    done: set[str] = field(default_factory=set)
    answered: int = 0
    failed: int = 0
    torn_bytes_removed: int = 0
    invalid_lines_removed: int = 0
    duplicate_lines_removed: int = 0
    error_lines_removed: int = 0


def iter_output_lines(path: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Yield each line of an output file with its parsed object, or None if invalid.

    A line is valid when it is a JSON object with an `id`.
    """
    with path.open("rb") as file:
        for raw in file:
            try:
                data = json.loads(raw)
            except ValueError:
                yield raw, None
                continue
            if isinstance(data, dict) and "id" in data:
                yield raw, data
            else:
                yield raw, None


def is_error_line(data: dict[str, Any]) -> bool:
    """Tell whether an output line records a failure."""
    return "error" in data


def prepare_output(path: Path, *, retry_errors: bool = False) -> OutputState:
    """Repair the output file and return the ids it already contains.

    1. Truncate a torn last line left by a killed run.
    2. Scan the file. For each id only the last line counts.
    3. When the file has invalid lines, repeated ids, or (with `retry_errors`)
       error lines, rewrite it atomically without them, so that the lines of
       this run can be appended and each id still appears once.
    """
    state = OutputState()
    _remove_stale_temp_files(path)
    if not path.exists():
        return state
    state.torn_bytes_removed = truncate_torn_tail(path)

    last_line_of: dict[str, tuple[int, bool]] = {}
    for index, (_, data) in enumerate(iter_output_lines(path)):
        if data is None:
            state.invalid_lines_removed += 1
            continue
        key = record_key(data["id"])
        if key in last_line_of:
            state.duplicate_lines_removed += 1
        last_line_of[key] = (index, is_error_line(data))

    if retry_errors:
        state.error_lines_removed = sum(
            is_error for _, is_error in last_line_of.values()
        )
        last_line_of = {
            key: value for key, value in last_line_of.items() if not value[1]
        }
    if (
        state.invalid_lines_removed
        or state.duplicate_lines_removed
        or state.error_lines_removed
    ):
        kept_indexes = {index for index, _ in last_line_of.values()}
        _rewrite_keeping(path, kept_indexes)
        _log_compaction(path, state)

    state.done = set(last_line_of)
    state.failed = sum(is_error for _, is_error in last_line_of.values())
    state.answered = len(last_line_of) - state.failed
    return state


def truncate_torn_tail(path: Path) -> int:
    """Cut the file after its last newline and return how many bytes were cut."""
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _TAIL_CHUNK_BYTES)
            file.seek(start)
            chunk = file.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        file.truncate(end)
        file.flush()
        os.fsync(file.fileno())
    logger.warning(
        "Removed a torn last line (%d bytes) from %s, left by an interrupted run",
        size - end,
        path,
    )
    return size - end


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temp_files(path: Path) -> None:
    """Delete the temporary files of a rewrite that a killed run left behind.

    Only safe while holding the `OutputLock` of `path`.
    """
    for stale in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"):
        logger.info("Removing %s, left by a run killed during a rewrite", stale)
        stale.unlink(missing_ok=True)


def _rewrite_keeping(path: Path, kept_indexes: set[int]) -> None:
    """Replace `path` atomically by a copy with only the lines in `kept_indexes`."""
    descriptor, temp_name = tempfile.mkstemp(
        prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as temp, path.open("rb") as source:
            for index, raw in enumerate(source):
                if index in kept_indexes:
                    temp.write(raw)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    if sys.platform == "win32":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _log_compaction(path: Path, state: OutputState) -> None:
    logger.info(
        "Rewrote %s: removed %d invalid lines, %d superseded lines of repeated "
        "ids and %d error lines to retry",
        path,
        state.invalid_lines_removed,
        state.duplicate_lines_removed,
        state.error_lines_removed,
    )
    if state.invalid_lines_removed:
        logger.warning(
            "Removed %d lines of %s that are not JSON objects with an id; their "
            "records run again",
            state.invalid_lines_removed,
            path,
        )


class OutputWriter:
    """Appends whole JSON lines to the output file.

    Each line goes out in one `os.write` on an `O_APPEND` descriptor, and the
    file is fsynced at most every `fsync_interval` seconds and on close. Lines
    already written survive a killed process either way; fsync guards them
    against a crash of the machine.
    """

    def __init__(self, path: Path, *, fsync_interval: float = 1.0):
        self.path = path
        self.lines_written = 0
        self._fsync_interval = fsync_interval
        self._last_fsync = time.monotonic()
        self._descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: dict[str, Any]) -> None:
        """Append `line` as one JSON line."""
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        # A regular file takes the whole buffer in one write unless the disk is
        # full or a signal kills the process. The loop covers that short write.
        while view:
            written = os.write(self._descriptor, view)
            view = view[written:]
        self.lines_written += 1
        if time.monotonic() - self._last_fsync >= self._fsync_interval:
            self.sync()

    def sync(self) -> None:
        """Flush the written lines to disk."""
        os.fsync(self._descriptor)
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        """Flush and close the file; calling it again does nothing."""
        if self._descriptor < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._descriptor)
            self._descriptor = -1


class OutputLock:
    """An exclusive advisory lock that keeps two runs off one output file.

    The lock is an `flock` on a hidden file next to the output, because the
    output itself may be replaced by a compaction. It is not taken on Windows.
    """

    def __init__(self, output_path: Path):
        self.output_path = output_path
        self.path = output_path.parent / f".{output_path.name}.lock"
        self._descriptor = -1

    def acquire(self) -> None:
        """Take the lock, or raise OutputLockedError when another run has it."""
        if sys.platform == "win32":
            return
        import fcntl

        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._descriptor)
            self._descriptor = -1
            raise OutputLockedError(
                f"another batch run is writing {self.output_path} (lock file "
                f"{self.path} is locked); wait for that run to end or stop it"
            ) from exc

    def release(self) -> None:
        """Release the lock; the lock file stays so that no two runs race on it."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
