"""Limit on the requests that generate at once, with a bounded wait queue."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class ServerBusyError(Exception):
    """Raised when the wait queue is full."""


class GenerationGate:
    """Admit at most `limit()` requests at once; later ones wait in FIFO order.

    `limit()` and `max_queue()` are read on every call, so a change of the
    behaviour applies at once. Call `wake()` after raising the limit.
    `on_change()` runs whenever `active` or `waiting` changes.
    """

    def __init__(
        self,
        limit: Callable[[], int | None],
        max_queue: Callable[[], int | None],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._limit = limit
        self._max_queue = max_queue
        self._on_change = on_change
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.active = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _has_room(self) -> bool:
        limit = self._limit()
        return limit is None or self.active < limit

    def _admit(self) -> None:
        self.active += 1

    async def acquire(self) -> None:
        """Wait for a free slot; raise ServerBusyError when the queue is full."""
        if not self._waiters and self._has_room():
            self._admit()
            self._on_change()
            return
        max_queue = self._max_queue()
        if max_queue is not None and len(self._waiters) >= max_queue:
            raise ServerBusyError
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._on_change()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was granted just before the cancellation arrived.
                self.release()
            else:
                self._waiters.remove(waiter)
                self._on_change()
            raise

    def release(self) -> None:
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Grant free slots to the longest waiting requests."""
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._admit()
            waiter.set_result(None)
        self._on_change()
