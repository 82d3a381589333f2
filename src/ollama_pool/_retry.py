"""Backoff between retry rounds and the retry budget."""

from __future__ import annotations

import collections
import random
import time


def backoff_delay(
    round_number: int, base: float, maximum: float, rng: random.Random
) -> float:
    """Return the wait before retry round `round_number` (2 for the first retry).

    The delay is `min(maximum, base * 2 ** (round_number - 2))`, of which a random
    half is dropped ("equal jitter"), so that callers that failed together do not
    come back together.
    """
    ceiling = min(maximum, base * 2 ** max(0, round_number - 2))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class RetryBudget:
    """Caps retries at a share of recent requests, plus a small minimum.

    Over a sliding window of `window` seconds, retries may not pass
    `minimum + ratio * requests`. When the whole fleet is down this keeps the pool
    from multiplying its load by the number of attempts per request. Counts are
    kept in one-second buckets, so memory stays bounded. The caller holds a lock.
    """

    def __init__(self, ratio: float, minimum: int, window: float = 10.0):
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        # Each bucket: [second, requests, retries].
        self._buckets: collections.deque[list[int]] = collections.deque()

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        while self._buckets and self._buckets[0][0] <= second - self.window:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def record_request(self, now: float | None = None) -> None:
        self._bucket(time.monotonic() if now is None else now)[1] += 1

    def try_spend(self, now: float | None = None) -> bool:
        """Count one retry and return True, or return False if the budget is spent."""
        bucket = self._bucket(time.monotonic() if now is None else now)
        requests = sum(entry[1] for entry in self._buckets)
        retries = sum(entry[2] for entry in self._buckets)
        if retries >= self.minimum + self.ratio * requests:
            return False
        bucket[2] += 1
        return True
