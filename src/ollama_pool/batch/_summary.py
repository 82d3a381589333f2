"""The end-of-run summary: as a dict for JSON and as text for the terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_pool.batch._output import is_error_line, iter_output_lines
from ollama_pool.batch._stats import RunStats
from ollama_pool.rag.metrics import ScoreAccumulator


@dataclass
class OutputTotals:
    """Counts over the whole output file after the run, earlier runs included."""

    lines: int = 0
    answered: int = 0
    failed: int = 0
    scores: ScoreAccumulator = field(default_factory=ScoreAccumulator)

    def to_dict(self) -> dict[str, Any]:
        totals: dict[str, Any] = {
            "lines": self.lines,
            "answered": self.answered,
            "failed": self.failed,
        }
        if self.scores.count:
            totals["scores"] = self.scores.summary()
        return totals


def scan_output_totals(path: Path) -> OutputTotals:
    """Count the answered and failed lines of an output file and average its scores."""
    totals = OutputTotals()
    if not path.exists():
        return totals
    for _, data in iter_output_lines(path):
        if data is None:
            continue
        totals.lines += 1
        if is_error_line(data):
            totals.failed += 1
            continue
        totals.answered += 1
        exact_match, f1 = data.get("exact_match"), data.get("f1")
        if isinstance(exact_match, (int, float)) and isinstance(f1, (int, float)):
            totals.scores.count += 1
            totals.scores.exact_match_total += exact_match
            totals.scores.f1_total += f1
    return totals


@dataclass
class BatchSummary:
    """The result of one batch run."""

    input_path: Path
    output_path: Path
    workers: int
    wall_time: float
    interrupted: bool
    stats: RunStats
    output_totals: OutputTotals
    # `OllamaPool.stats()` at the end of the run, when the chain ran on a pool.
    pool_stats: list[dict[str, Any]] | None = None
    # The signal that stopped the run early, such as "SIGINT".
    signal_name: str | None = None

    @property
    def failed(self) -> int:
        """Records that failed in this run."""
        return self.stats.failed

    @property
    def throughput(self) -> float:
        """Records answered or failed per second of wall time in this run."""
        done = self.stats.answered + self.stats.failed
        return done / self.wall_time if self.wall_time > 0 else 0.0

    def failure_reason(self) -> str | None:
        """Explain the failures of this run in one line, or None when there are none.

        Example: "12 of 200 records failed: 12 AllAttemptsFailedError (all 3
        attempts failed: ...)".
        """
        failures = self.stats.failures
        if not failures.total:
            return None
        run = self.stats.answered + failures.total
        causes = "; ".join(
            f"{item['records']} {item['type']} ({_shorten(item['example'])})"
            for item in failures.to_list()
        )
        return f"{failures.total} of {run} records failed: {causes}"

    def instances(self) -> list[dict[str, Any]]:
        """Return one row per instance: records, model calls, tokens, latency.

        Pool counters (health, requests, failed attempts) are added when the
        run had a pool.
        """
        rows: dict[str, dict[str, Any]] = {}
        for entry in self.pool_stats or []:
            url = str(entry.get("url"))
            rows[url] = _instance_row(url) | {
                "healthy": entry.get("healthy"),
                "pool_requests": entry.get("requests"),
                "pool_failures": entry.get("failures"),
            }
        for name, stats in self.stats.instances.items():
            row = rows.setdefault(name, _instance_row(name))
            row.update(
                records=stats.records,
                model_calls=stats.model_calls,
                input_tokens=stats.input_tokens,
                output_tokens=stats.output_tokens,
                latency_p50_s=_rounded(stats.latency.percentile(50)),
                latency_p95_s=_rounded(stats.latency.percentile(95)),
            )
        return list(rows.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict (see docs/batch.md)."""
        stats = self.stats
        summary: dict[str, Any] = {
            "input": str(self.input_path),
            "output": str(self.output_path),
            "workers": self.workers,
            "interrupted": self.interrupted,
            "signal": self.signal_name,
            "wall_time_s": round(self.wall_time, 3),
            "records": {
                "read": stats.read,
                "answered": stats.answered,
                "failed": stats.failed,
                "skipped": stats.skipped,
                "not_run": stats.not_run,
                "cancelled": stats.cancelled,
            },
            "throughput_records_per_s": round(self.throughput, 3),
            "latency_s": {
                "p50": _rounded(stats.record_latency.percentile(50)),
                "p95": _rounded(stats.record_latency.percentile(95)),
            },
            "instances": self.instances(),
            "failures": stats.failures.to_list(),
            "failure_reason": self.failure_reason(),
            "output_totals": self.output_totals.to_dict(),
        }
        if stats.scores.count:
            summary["scores"] = stats.scores.summary()
        return summary

    def format_text(self) -> str:
        """Return the summary as lines of plain text for a terminal."""
        stats = self.stats
        state = f"stopped by {self.signal_name}" if self.interrupted else "finished"
        lines = [
            f"Batch {state} in {self.wall_time:.1f} s with {self.workers} workers: "
            f"{stats.read} records read, {stats.answered} answered, "
            f"{stats.failed} failed, {stats.skipped} skipped (already in the output)",
            f"Throughput {self.throughput:.2f} records/s; record latency "
            f"p50 {_seconds(stats.record_latency.percentile(50))}, "
            f"p95 {_seconds(stats.record_latency.percentile(95))}",
        ]
        if stats.not_run or stats.cancelled:
            lines.append(
                f"Not run: {stats.not_run} records, cancelled in flight: "
                f"{stats.cancelled}; run the same command again to finish them"
            )
        lines.extend(self._instance_table())
        if stats.scores.count:
            lines.append(
                f"Scores over {stats.scores.count} answered records: "
                f"EM {stats.scores.exact_match_mean:.3f}, F1 {stats.scores.f1_mean:.3f}"
            )
        lines.append(self._output_line())
        return "\n".join(lines)

    def _instance_table(self) -> list[str]:
        rows = self.instances()
        if not rows:
            return []
        width = max(len("instance"), *(len(row["instance"]) for row in rows))
        header = (
            f"{'instance':<{width}}  {'records':>7}  {'calls':>6}  "
            f"{'failures':>8}  {'p50':>8}  {'p95':>8}"
        )
        lines = [header]
        for row in rows:
            failures = row.get("pool_failures")
            lines.append(
                f"{row['instance']:<{width}}  {row['records']:>7}  "
                f"{row['model_calls']:>6}  "
                f"{'-' if failures is None else failures:>8}  "
                f"{_seconds(row['latency_p50_s']):>8}  "
                f"{_seconds(row['latency_p95_s']):>8}"
            )
        return lines

    def _output_line(self) -> str:
        totals = self.output_totals
        line = (
            f"Output {self.output_path}: {totals.lines} lines, "
            f"{totals.answered} answered, {totals.failed} failed"
        )
        if totals.scores.count:
            line += (
                f"; EM {totals.scores.exact_match_mean:.3f}, "
                f"F1 {totals.scores.f1_mean:.3f} over {totals.scores.count} scored"
            )
        return line


def _instance_row(name: str) -> dict[str, Any]:
    return {
        "instance": name,
        "records": 0,
        "model_calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "latency_p50_s": None,
        "latency_p95_s": None,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _shorten(text: str, limit: int = 300) -> str:
    """Join the lines of an error message into one, cut at `limit` characters."""
    joined = " ".join(text.split())
    if len(joined) <= limit:
        return joined
    return joined[: limit - 3] + "..."
