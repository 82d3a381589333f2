"""The batch runner: input records through a chain with N asyncio workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from langchain_core.runnables import Runnable

from ollama_pool._urls import redact_url
from ollama_pool.batch._chain import answer_text
from ollama_pool.batch._errors import DuplicateIdError
from ollama_pool.batch._output import OutputLock, OutputWriter, prepare_output
from ollama_pool.batch._progress import NoProgress, ProgressReporter
from ollama_pool.batch._records import (
    InputRecord,
    InvalidLine,
    RecordId,
    count_lines,
    iter_input,
    line_id,
    record_key,
)
from ollama_pool.batch._stats import RunStats
from ollama_pool.batch._summary import BatchSummary, scan_output_totals
from ollama_pool.batch._tracking import CallTracker
from ollama_pool.rag.metrics import gold_answers

logger = logging.getLogger(__name__)

# The input reader yields to the event loop after this many lines, so that a
# long run of already answered records does not starve the workers.
_YIELD_EVERY_LINES = 256
_URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


@dataclass(frozen=True)
class BatchOptions:
    """Settings of one batch run."""

    input_path: Path
    output_path: Path
    workers: int = 4
    # Run again the records whose line in the output is an error line.
    retry_errors: bool = False
    id_field: str = "id"
    question_field: str = "question"
    # Seconds between two fsyncs of the output file.
    fsync_interval: float = 1.0
    # Stop cleanly on SIGINT and SIGTERM (only possible in the main thread).
    handle_signals: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


class PoolLike(Protocol):
    def stats(self) -> list[dict[str, Any]]: ...


def default_workers(pool: Any, configured: int | None = None) -> int:
    """Return the number of workers: `configured`, else twice the healthy instances.

    A pool whose instances all look unhealthy gets two workers per instance,
    since the health state may be stale at start.
    """
    if configured:
        return configured
    instances = list(getattr(pool, "instances", ()))
    healthy = sum(1 for instance in instances if getattr(instance, "healthy", True))
    return 2 * (healthy or len(instances) or 1)


async def arun_batch(
    chain: Runnable[Any, Any],
    options: BatchOptions,
    *,
    pool: PoolLike | None = None,
    progress: ProgressReporter | None = None,
) -> BatchSummary:
    """Run every input record through `chain` and append a line per record.

    The output file is repaired and compacted first (see `prepare_output`);
    records whose id already has a line there are skipped. `pool` only feeds the
    per-instance counters of the summary. Raises `OutputLockedError` when
    another run writes the same output file.
    """
    with OutputLock(options.output_path):
        state = prepare_output(options.output_path, retry_errors=options.retry_errors)
        run = _BatchRun(chain, options, state.done, progress or NoProgress())
        started = time.monotonic()
        await run.run()
        wall_time = time.monotonic() - started

    return BatchSummary(
        input_path=options.input_path,
        output_path=options.output_path,
        workers=options.workers,
        wall_time=wall_time,
        interrupted=run.stop_signal is not None,
        stats=run.stats,
        output_totals=scan_output_totals(options.output_path),
        pool_stats=pool.stats() if pool is not None else None,
        signal_name=run.stop_signal.name if run.stop_signal else None,
    )


def run_batch(
    chain: Runnable[Any, Any],
    options: BatchOptions,
    *,
    pool: PoolLike | None = None,
    progress: ProgressReporter | None = None,
) -> BatchSummary:
    """Run `arun_batch` in a new event loop."""
    return asyncio.run(arun_batch(chain, options, pool=pool, progress=progress))


class _BatchRun:
    """The state of one run: reader task, worker tasks, output and counters."""

    def __init__(
        self,
        chain: Runnable[Any, Any],
        options: BatchOptions,
        done: set[str],
        progress: ProgressReporter,
    ):
        self._chain = chain
        self._options = options
        self._done = done
        self._progress = progress
        # Input line number of the first record of each id seen in this run.
        self._first_line_of: dict[str, int] = {}
        self._queue: asyncio.Queue[InputRecord | None] = asyncio.Queue(
            maxsize=2 * options.workers
        )
        self._writer: OutputWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        # The record the reader waits to put into the full queue.
        self._waiting_record: InputRecord | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._fatal_error: BaseException | None = None
        self.stats = RunStats()
        self.stop_signal: signal.Signals | None = None

    async def run(self) -> None:
        options = self._options
        self._progress.start(count_lines(options.input_path))
        self._writer = OutputWriter(
            options.output_path, fsync_interval=options.fsync_interval
        )
        try:
            with self._signal_handlers():
                await self._run_tasks()
        finally:
            for task in (self._reader, *self._workers):
                if task is not None:
                    task.cancel()
            self._writer.close()
            self._progress.stop()

    async def _run_tasks(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"batch-worker-{index}")
            for index in range(self._options.workers)
        ]
        self._reader = asyncio.create_task(self._read_input(), name="batch-reader")
        await asyncio.wait([self._reader])
        reader_error = None
        if not self._reader.cancelled():
            reader_error = self._reader.exception()
        if reader_error is not None:
            # Let the queued records run, then report why reading stopped.
            for _ in self._workers:
                await self._queue.put(None)
        await asyncio.wait(self._workers)
        for error in (self._fatal_error, reader_error):
            if error is not None:
                raise error

    # Reading input

    async def _read_input(self) -> None:
        options = self._options
        records = iter_input(
            options.input_path,
            id_field=options.id_field,
            question_field=options.question_field,
        )
        with contextlib.closing(records):
            for count, item in enumerate(records, start=1):
                if count % _YIELD_EVERY_LINES == 0:
                    await asyncio.sleep(0)
                record = self._admit(item)
                if record is not None:
                    self._waiting_record = record
                    await self._queue.put(record)
                    self._waiting_record = None
        for _ in self._workers:
            await self._queue.put(None)

    def _admit(self, item: InputRecord | InvalidLine) -> InputRecord | None:
        """Return `item` if a worker must run it; otherwise write or skip it here."""
        self.stats.read += 1
        key = record_key(item.id)
        first_line = self._first_line_of.get(key)
        if first_line is not None:
            self._reject_duplicate(item, first_line)
            return None

        self._first_line_of[key] = item.line_number
        if key in self._done:
            self.stats.skipped += 1
            self._progress.advance(skipped=True)
            return None
        if isinstance(item, InvalidLine):
            self._write_error(item.id, item.line_number, item.error)
            return None
        return item

    def _reject_duplicate(
        self, item: InputRecord | InvalidLine, first_line: int
    ) -> None:
        own_id = line_id(item.line_number)
        if record_key(own_id) in self._done:
            self.stats.skipped += 1
            self._progress.advance(skipped=True)
            return
        error = DuplicateIdError(
            f"input line {item.line_number}: id {item.id!r} repeats the id of "
            f"input line {first_line}"
        )
        self._write_error(own_id, item.line_number, error, duplicate_of=item.id)

    # Running records

    async def _work(self) -> None:
        try:
            while True:
                record = await self._queue.get()
                if record is None:
                    return
                await self._run_record(record)
        except Exception as exc:
            # An error outside the chain (the output file cannot be written)
            # ends the run: no worker takes a new record.
            if self._fatal_error is None:
                self._fatal_error = exc
                self._stop_reading()
            raise

    async def _run_record(self, record: InputRecord) -> None:
        tracker = CallTracker()
        config: dict[str, Any] = {
            "callbacks": [tracker],
            "metadata": {"batch_record_id": record.id},
        }
        started = time.monotonic()
        try:
            output = await self._chain.ainvoke(record.data, config=config)  # type: ignore[arg-type]
            answer = answer_text(output)
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        except Exception as exc:
            # Any error of a user chain fails this record only: it gets an error
            # line, the summary counts it, and the run goes on.
            latency = time.monotonic() - started
            self._write_error(record.id, record.line_number, exc, latency=latency)
            return
        latency = time.monotonic() - started
        self._write_answer(record, answer, tracker, latency)

    # Writing lines

    def _write_answer(
        self, record: InputRecord, answer: str, tracker: CallTracker, latency: float
    ) -> None:
        calls = tracker.calls
        instance = tracker.instance
        line: dict[str, Any] = {
            "id": record.id,
            "line": record.line_number,
            "answer": answer,
            "instance": instance,
            "latency_s": round(latency, 4),
            "model_calls": len(calls),
            "input_tokens": sum(call.input_tokens for call in calls),
            "output_tokens": sum(call.output_tokens for call in calls),
            "total_tokens": sum(call.total_tokens for call in calls),
        }
        golds = gold_answers(record.data) if "answer" in record.data else []
        if golds:
            line["exact_match"], line["f1"] = self.stats.scores.add(answer, golds)
        self._write(line)
        self.stats.add_answer(latency, calls, instance)
        self._progress.advance()

    def _write_error(
        self,
        record_id: RecordId,
        line_number: int,
        error: BaseException,
        *,
        latency: float | None = None,
        duplicate_of: RecordId | None = None,
    ) -> None:
        error_type = type(error).__name__
        message = redact_urls(str(error) or repr(error))
        line: dict[str, Any] = {"id": record_id, "line": line_number}
        if duplicate_of is not None:
            line["duplicate_of"] = duplicate_of
        line["error"] = {"type": error_type, "message": message}
        if latency is not None:
            line["latency_s"] = round(latency, 4)
        self._write(line)

        if error_type not in self.stats.failures.counts:
            logger.warning("Record %r failed: %s: %s", record_id, error_type, message)
        else:
            logger.debug("Record %r failed: %s: %s", record_id, error_type, message)
        self.stats.failures.add(error_type, message)
        self._progress.advance(failed=True)

    def _write(self, line: dict[str, Any]) -> None:
        assert self._writer is not None, "lines are only written during run()"
        self._writer.write(line)

    # Stopping

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        installed: list[signal.Signals] = []
        if self._options.handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    # Not the main thread, or no signal support (Windows).
                    continue
                installed.append(signum)
        try:
            yield
        finally:
            for signum in installed:
                asyncio.get_running_loop().remove_signal_handler(signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        """Stop reading on the first signal; cancel records in flight on the next."""
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum)
            logger.warning(
                "%s received: no new records start; waiting for the records in "
                "flight (send it again to cancel them)",
                self.stop_signal.name,
            )
            self._stop_reading()
            return
        logger.warning("%s received again: cancelling the records in flight", signum)
        for worker in self._workers:
            worker.cancel()

    def _stop_reading(self) -> None:
        """Cancel the reader and let each worker end after its current record."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            if self._waiting_record is not None:
                self.stats.not_run += 1
        while not self._queue.empty():
            if self._queue.get_nowait() is not None:
                self.stats.not_run += 1
        for _ in self._workers:
            self._queue.put_nowait(None)


def redact_urls(text: str) -> str:
    """Mask the password of every URL in `text`."""
    return _URL_PATTERN.sub(lambda match: redact_url(match.group(0)), text)
