"""Counters and latency percentiles of a batch run, in constant memory."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ollama_pool.batch._tracking import ModelCall
from ollama_pool.rag.metrics import ScoreAccumulator

# Name under which records are counted when no model call reported an instance.
UNKNOWN_INSTANCE = "unknown"


class LatencyHistogram:
    """Latency samples in logarithmic buckets, for percentiles in bounded memory.

    Bucket edges grow by `growth` (1% by default), so a percentile is exact to
    within that factor. Samples below `minimum` seconds share the first bucket.
    """

    def __init__(self, minimum: float = 1e-4, growth: float = 1.01):
        self._minimum = minimum
        self._log_growth = math.log(growth)
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, seconds: float) -> None:
        """Record one sample in seconds."""
        index = 0
        if seconds > self._minimum:
            index = int(math.log(seconds / self._minimum) / self._log_growth)
        self._buckets[index] += 1
        self.count += 1

    def percentile(self, percent: float) -> float | None:
        """Return the `percent` percentile (0 to 100) in seconds, None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(self.count * percent / 100))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                # The middle of the bucket, on a logarithmic scale.
                return self._minimum * math.exp((index + 0.5) * self._log_growth)
        raise AssertionError("unreachable: the ranks add up to count")


@dataclass
class InstanceStats:
    """Per-instance totals of one run, from the callbacks of the answered records."""

    records: int = 0
    model_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add_call(self, call: ModelCall) -> None:
        self.model_calls += 1
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        if call.latency is not None:
            self.latency.add(call.latency)


@dataclass
class FailureStats:
    """Failed records grouped by error type, with the first message of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, error_type: str, message: str) -> None:
        self.counts[error_type] += 1
        self.examples.setdefault(error_type, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_list(self) -> list[dict[str, Any]]:
        return [
            {"type": name, "records": count, "example": self.examples[name]}
            for name, count in self.counts.most_common()
        ]


@dataclass
class RunStats:
    """Everything counted while a batch runs."""

    read: int = 0
    answered: int = 0
    skipped: int = 0
    not_run: int = 0
    cancelled: int = 0
    failures: FailureStats = field(default_factory=FailureStats)
    record_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    instances: dict[str, InstanceStats] = field(default_factory=dict)
    scores: ScoreAccumulator = field(default_factory=ScoreAccumulator)

    @property
    def failed(self) -> int:
        return self.failures.total

    def add_answer(
        self, latency: float, calls: list[ModelCall], instance: str | None
    ) -> None:
        """Count an answered record, crediting it to the instance of its last call."""
        self.answered += 1
        self.record_latency.add(latency)
        for call in calls:
            self._instance(call.instance or UNKNOWN_INSTANCE).add_call(call)
        self._instance(instance or UNKNOWN_INSTANCE).records += 1

    def _instance(self, name: str) -> InstanceStats:
        stats = self.instances.get(name)
        if stats is None:
            stats = self.instances[name] = InstanceStats()
        return stats
