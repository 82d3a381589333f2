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

    The pool uses it as follows:

    - Only retries after an instance failed (error answer, broken stream,
      refused connection, timeout) spend the budget. A "server busy" answer does
      not: the server rejected the request before doing any work, and the pool
      answers it by lowering that instance's busy limit, so the retry waits in
      the pool for a slot and adds no load. A 404 for a missing model does not
      either, because the instance then gets no more requests for that model.
    - A retry that finds the budget spent is not failed at once. Its round ends
      and the request waits the round's backoff before it asks again, failing
      only when its `max_retries` rounds are used up. A short burst of failures
      then costs latency rather than answers, while during a long outage each
      window still carries at most the budget's retries.
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
